"""worklist_items (status, completed_at): the latest completed items without sorting them all

``/api/stats`` reports receipt-to-read times over the latest completed items of each model; with
this index the database walks the completed items newest first and stops after them, instead of
sorting every completed item on each request.

Revision ID: 0015
Revises: 0011
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0015'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_worklist_items_status_completed_at', 'worklist_items', ['status', 'completed_at'])


def downgrade() -> None:
    op.drop_index('ix_worklist_items_status_completed_at', table_name='worklist_items')
