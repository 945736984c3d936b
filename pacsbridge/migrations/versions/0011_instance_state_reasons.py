"""instances.state_reasons: every reason an image was refused, as a JSON list

``state_reason`` keeps the joined human text (headline first); ``state_reasons`` holds the same
reasons as ``[{"code", "text"}, ...]`` so that faces can show them one by one.  Rows written before
this revision have none: readers fall back to one reason made from ``state_reason``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state_reasons', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('state_reasons')
