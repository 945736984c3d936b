"""Indexes for the live figures: latest completed items, and weekly counts without table reads

- worklist_items (status, completed_at): ``/api/stats`` reports receipt-to-read times over the
  latest completed items of each model; the database walks them newest first and stops, instead
  of sorting every completed item on each request.
- predictions (created_at, model_id, calibration, positive, shadow) and instances (received_at,
  state): the weekly figures (and the prediction counts of ``/api/stats``) count a range of
  weeks from the index alone, without reading a table row per image.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_worklist_items_status_completed_at', 'worklist_items', ['status', 'completed_at'])
    op.create_index('ix_predictions_created_model', 'predictions',
                    ['created_at', 'model_id', 'calibration', 'positive', 'shadow'])
    op.create_index('ix_instances_received_state', 'instances', ['received_at', 'state'])


def downgrade() -> None:
    op.drop_index('ix_instances_received_state', table_name='instances')
    op.drop_index('ix_predictions_created_model', table_name='predictions')
    op.drop_index('ix_worklist_items_status_completed_at', table_name='worklist_items')
