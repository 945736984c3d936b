"""instances.attempts / next_attempt_at / last_error: the `failed` state with retries

A fault of the system (spool file missing, decoder or model crash, non-finite score) now leaves an
instance ``failed`` and is retried with backoff, instead of the final ``not_analysed`` that is kept
for what the image is.  Rows recorded ``not_analysed`` before this revision for one of those faults
are moved to ``failed``, due at once, so the worker tries them again; their recorded reason is
one of:

- ``the stored file is missing from the spool``
- ``could not decode the image (...)``        (an unexpected exception from the decoder)
- ``the model failed on this image ...``
- ``the model produced a non-finite score``

Every other ``not_analysed`` row (out of scope, undecodable or corrupt data, too large, quality
gate, out of distribution, file deleted by retention) is left as it is.  The downgrade makes every
``failed`` row ``not_analysed`` again with its reason.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

#: SQL LIKE patterns of the reasons the worker recorded for faults of the system before 0007.
TRANSIENT_REASONS = (
    'the stored file is missing from the spool',
    'could not decode the image (%',
    'the model failed on this image%',
    'the model produced a non-finite score',
)


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_error', sa.Text(), nullable=True))
        batch_op.create_index('ix_instances_next_attempt_at', ['next_attempt_at'], unique=False)
    instances = sa.table('instances', sa.column('state', sa.String), sa.column('state_reason', sa.Text),
                         sa.column('next_attempt_at', sa.DateTime(timezone=True)),
                         sa.column('last_error', sa.Text))
    transient = sa.or_(*(instances.c.state_reason.like(p) for p in TRANSIENT_REASONS))
    op.execute(instances.update()
               .where(instances.c.state == 'not_analysed', transient)
               .values(state='failed', last_error=instances.c.state_reason, next_attempt_at=sa.func.now()))


def downgrade() -> None:
    instances = sa.table('instances', sa.column('state', sa.String))
    op.execute(instances.update().where(instances.c.state == 'failed').values(state='not_analysed'))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_next_attempt_at')
        batch_op.drop_column('last_error')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('attempts')
