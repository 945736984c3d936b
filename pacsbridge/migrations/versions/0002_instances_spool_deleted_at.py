"""instances.spool_deleted_at: when retention deleted the spool file

Before this revision retention marked a deleted file with an empty ``file_path``.  Upgrading
gives those rows their path back (it is a pure function of the SOP Instance UID: the spool names
files by its SHA-256) and records ``spool_deleted_at`` (their last update, the best time known).
Downgrading goes back to the empty ``file_path`` marker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

instances = sa.table(
    'instances',
    sa.column('id', sa.Integer), sa.column('sop_instance_uid', sa.String), sa.column('file_path', sa.String),
    sa.column('updated_at', sa.DateTime(timezone=True)), sa.column('spool_deleted_at', sa.DateTime(timezone=True)),
)


def _spool_relpath(sop_instance_uid: str) -> str:
    # Frozen copy of pacsbridge.store.spool.spool_relpath as of this revision.
    digest = hashlib.sha256(sop_instance_uid.encode('ascii', 'replace')).hexdigest()
    return f'{digest[:2]}/{digest[2:4]}/{digest}.dcm'


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spool_deleted_at', sa.DateTime(timezone=True), nullable=True))

    conn = op.get_bind()
    rows = conn.execute(
        sa.select(instances.c.id, instances.c.sop_instance_uid, instances.c.updated_at)
        .where(instances.c.file_path == '')
    ).all()
    for iid, sop, updated_at in rows:
        conn.execute(
            instances.update().where(instances.c.id == iid)
            .values(file_path=_spool_relpath(sop), spool_deleted_at=updated_at)
        )


def downgrade() -> None:
    op.get_bind().execute(
        instances.update().where(instances.c.spool_deleted_at.is_not(None)).values(file_path='')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('spool_deleted_at')
