"""Live monitoring: predictions.shadow, the labels table, an index on studies.accession_number

``predictions.shadow`` says whether a prediction was made in shadow mode (``mode = "shadow"``):
such predictions never become worklist items nor outbox entries, also after switching to live.
Rows written before this revision get false: shadow mode did not exist then.

``labels`` holds ground truth from the RIS (``pacsbridge labels import``), one row per study key
and source file; ``study_id`` is filled once the study has arrived.  Reader findings are not
copied here: completed worklist items are read as labels where they are.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shadow', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        'labels',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('source', sa.String(length=200), nullable=False),
        sa.Column('study_key', sa.String(length=80), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
        sa.Column('accession_number', sa.String(length=16), nullable=True),
        sa.Column('finding', sa.String(length=16), nullable=False),
        sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('study_id', sa.Integer(), nullable=True),
        sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_labels_study_id_studies'),
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_labels')),
        sa.UniqueConstraint('source', 'study_key', name='uq_labels_source_study_key'),
    )
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_labels_study_id'), ['study_id'], unique=False)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_accession_number'), ['accession_number'], unique=False)
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_created_at'))
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_accession_number'))
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_labels_study_id'))
    op.drop_table('labels')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('shadow')
