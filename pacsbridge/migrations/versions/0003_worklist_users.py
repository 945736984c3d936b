"""worklist item life cycle, study display fields, event actors, users and API tokens

* ``worklist_items``: status ``pending`` becomes ``scheduled``; claim columns (claimed_by/at,
  claim_expires_at, transaction_uid), the outcome (finding, comment, completed_at/by,
  cancel_reason), a UPS SOP Instance UID per item, and ``open_study_id`` (unique; the study id
  while the item is open, NULL once closed) replacing the unique ``study_id`` so that a study
  can have a new item after its earlier one was closed.  ``first_positive_at`` is recomputed
  from the study's first positive prediction (before this revision it held the study's arrival).
* ``studies``: patient name/age/birth date/sex, study description, referring physician.
* ``events``: ``actor`` (user name or ``ae:<AE>``) and ``worklist_item_id``.
* new tables ``users`` and ``api_tokens`` (SHA-256 of each token only).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pydicom.uid import generate_uid

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

items = sa.table(
    'worklist_items',
    sa.column('id', sa.Integer), sa.column('study_id', sa.Integer), sa.column('status', sa.String),
    sa.column('open_study_id', sa.Integer), sa.column('ups_uid', sa.String),
    sa.column('first_positive_at', sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('patient_age', sa.String(length=4), nullable=True))
        batch_op.add_column(sa.Column('patient_birth_date', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('patient_sex', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('study_description', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('referring_physician', sa.String(length=200), nullable=True))

    with op.batch_alter_table('worklist_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('open_study_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('ups_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('claim_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('transaction_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('finding', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('comment', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('completed_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('cancel_reason', sa.Text(), nullable=True))

    conn = op.get_bind()
    # Old states: pending and in_progress were open (nothing ever set in_progress), completed closed.
    conn.execute(items.update().where(items.c.status == 'pending').values(status='scheduled'))
    for iid, sid, status in conn.execute(sa.select(items.c.id, items.c.study_id, items.c.status)).all():
        conn.execute(items.update().where(items.c.id == iid).values(
            ups_uid=generate_uid(), open_study_id=sid if status in ('scheduled', 'in_progress') else None))
    # first_positive_at: the study's first positive prediction (it held the study's arrival before).
    first_positive = (
        "SELECT MIN(p.created_at) FROM predictions p JOIN instances i ON i.id = p.instance_id "
        "JOIN series s ON s.id = i.series_id WHERE s.study_id = worklist_items.study_id AND p.positive")
    conn.execute(sa.text(
        f"UPDATE worklist_items SET first_positive_at = ({first_positive}) WHERE EXISTS ({first_positive})"))

    with op.batch_alter_table('worklist_items', schema=None) as batch_op:
        batch_op.alter_column('ups_uid', existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_constraint('uq_worklist_items_study_id', type_='unique')
        batch_op.create_index(batch_op.f('ix_worklist_items_study_id'), ['study_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_worklist_items_claim_expires_at'), ['claim_expires_at'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_worklist_items_open_study_id'), ['open_study_id'])
        batch_op.create_unique_constraint(batch_op.f('uq_worklist_items_ups_uid'), ['ups_uid'])

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('worklist_item_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_events_worklist_item_id'), ['worklist_item_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_events_worklist_item_id_worklist_items'), 'worklist_items',
                                    ['worklist_item_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_events_worklist_item_id_worklist_items'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_events_worklist_item_id'))
        batch_op.drop_column('worklist_item_id')
        batch_op.drop_column('actor')

    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_user_id'))
    op.drop_table('api_tokens')
    op.drop_table('users')

    conn = op.get_bind()
    # 0002 allowed one item per study: keep each study's newest item.
    newest = sa.select(sa.func.max(items.c.id)).group_by(items.c.study_id)
    conn.execute(items.delete().where(items.c.id.not_in(newest)))
    conn.execute(items.update().where(items.c.status == 'scheduled').values(status='pending'))
    conn.execute(items.update().where(items.c.status == 'canceled').values(status='completed'))

    with op.batch_alter_table('worklist_items', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_worklist_items_ups_uid'), type_='unique')
        batch_op.drop_constraint(batch_op.f('uq_worklist_items_open_study_id'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_worklist_items_claim_expires_at'))
        batch_op.drop_index(batch_op.f('ix_worklist_items_study_id'))
        batch_op.create_unique_constraint(batch_op.f('uq_worklist_items_study_id'), ['study_id'])
        for column in ('cancel_reason', 'completed_by', 'completed_at', 'comment', 'finding', 'transaction_uid',
                       'claim_expires_at', 'claimed_at', 'claimed_by', 'ups_uid', 'open_study_id'):
            batch_op.drop_column(column)

    # Not batch mode: on SQLite that would copy and DROP the studies table, and with foreign keys on
    # the drop cascades to every series, instance and item.  SQLite >= 3.35 drops a column in place.
    for column in ('referring_physician', 'study_description', 'patient_sex', 'patient_birth_date',
                   'patient_age', 'patient_name'):
        op.drop_column('studies', column)
