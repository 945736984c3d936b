"""Several nodes: outbox claims with leases, and the scheduler leader's row

``outbox.claimed_by`` / ``outbox.lease_until``: the node sending an entry and until when its claim
holds; a claim whose lease ran out (the node died mid-send) may be taken by another node.
``scheduler_leader`` holds at most one row: the node that holds the scheduler's advisory lock,
since when, and (PostgreSQL) the backend pid of the lock's session, so any node can tell whether
that leader still holds the lock.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_outbox_destination'), ['destination'], unique=False)
    op.create_table(
        'scheduler_leader',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('node', sa.String(length=200), nullable=False),
        sa.Column('since', sa.DateTime(timezone=True), nullable=False),
        sa.Column('backend_pid', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_scheduler_leader')),
    )


def downgrade() -> None:
    op.drop_table('scheduler_leader')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_destination'))
        batch_op.drop_column('lease_until')
        batch_op.drop_column('claimed_by')
