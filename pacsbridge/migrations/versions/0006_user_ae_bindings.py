"""user_ae_bindings: which user a DICOM calling AE title acts as (UPS access control)

A reading station may use DICOM UPS only when its calling AE title is bound to a user; every UPS
action is then that user's, with the user's role.  An AE title is bound to at most one user.
``tls_subject``, when set, must equal the subject of the client certificate the station presents
over mutual TLS (RFC 4514 text, e.g. ``CN=READSTATION1,O=Hospital``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('user_ae_bindings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('tls_subject', sa.String(length=512), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_user_ae_bindings_user_id_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user_ae_bindings')),
    sa.UniqueConstraint('ae_title', name=op.f('uq_user_ae_bindings_ae_title'))
    )
    with op.batch_alter_table('user_ae_bindings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_ae_bindings_user_id'), ['user_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('user_ae_bindings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_ae_bindings_user_id'))
    op.drop_table('user_ae_bindings')
