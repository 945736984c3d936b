"""predictions.ood_score: how unlike the training data the scored image was

The model's out-of-distribution score (see ``pacsbridge.model.ood``) is recorded with every
prediction, so a site can watch its images drift towards the refusal threshold.  NULL for models
without OOD statistics and for rows written before this revision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ood_score', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('ood_score')
