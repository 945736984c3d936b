"""Audit reads of negatives: worklist_items.kind, studies.audit_decision

``worklist_items.kind`` is ``flag`` (a study the model scored positive) or ``audit`` (a study the
model scored negative, sampled for a blinded quality read); rows written before this revision are
flags.  ``studies.audit_decision`` records that a negative study was drawn for audit (``sampled``)
or drawn but left out because the day's cap was reached (``capped``), so that the decision is made
once per study and a resend or a later image never draws it again.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('worklist_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=8), nullable=False, server_default='flag'))
        batch_op.create_index(batch_op.f('ix_worklist_items_kind'), ['kind'], unique=False)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_decision', sa.String(length=8), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite that would copy and DROP the table, and with foreign keys on the drop
    # cascades (studies -> series, instances, items) or unlinks events.  SQLite >= 3.35 drops in place.
    op.drop_column('studies', 'audit_decision')
    op.drop_index(op.f('ix_worklist_items_kind'), table_name='worklist_items')
    op.drop_column('worklist_items', 'kind')
