"""workers.machine: where a worker's pid means something

A worker killed or crashed leaves claims whose lease still runs (``claim_lease_s``, 60 s). A worker
on the same machine (same host, boot and pid namespace) can see that the process is gone and take
the claims back at once; the machine is recorded so that workers in other containers with the same
host name never judge each other's pids.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('machine', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('machine')
