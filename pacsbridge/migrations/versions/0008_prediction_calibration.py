"""predictions.calibration: which operating point decided each prediction

``model`` when the model card's own threshold and OOD cut applied, else the short id of the site
calibration file in force (``site-`` + SHA-256 prefix; see ``pacsbridge.validation.calibration``).
Rows written before this revision get ``model``: no site calibration existed then.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('calibration', sa.String(length=32), nullable=False, server_default='model'))


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('calibration')
