"""worklist_items.draft_*: the holder's draft (finding, comment, cancellation reason) as columns

Before this revision, what a DICOM UPS performer sent with N-SET was kept as JSON in the detail of
``ups_performed_data`` events, tagged with a hash of the claim's Transaction UID, and read back by
searching the events.  Now each item holds the draft of its current claim in ``draft_finding``,
``draft_comment``, ``draft_cancel_reason``, ``draft_by`` and ``draft_at``.

Upgrade: for every in-progress item, the last such event recorded under its current claim becomes
its draft (drafts of earlier claims were already void); every ``ups_performed_data`` event keeps
its place in the history, its detail replaced by the one line written from now on (the draft moves,
it is not copied).  Downgrade: each item's draft is written back as one event in the old form.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

DRAFT_EVENT = 'ups_performed_data'

items = sa.table(
    'worklist_items', sa.column('id', sa.Integer), sa.column('status', sa.String),
    sa.column('transaction_uid', sa.String), sa.column('draft_finding', sa.String),
    sa.column('draft_comment', sa.Text), sa.column('draft_cancel_reason', sa.Text),
    sa.column('draft_by', sa.String), sa.column('draft_at', sa.DateTime(timezone=True)),
)
events = sa.table(
    'events', sa.column('id', sa.Integer), sa.column('at', sa.DateTime(timezone=True)),
    sa.column('kind', sa.String), sa.column('level', sa.String), sa.column('actor', sa.String),
    sa.column('worklist_item_id', sa.Integer), sa.column('detail', sa.Text),
)


def _txn_tag(transaction_uid: str | None) -> str:
    """How the events named a claim (its Transaction UID is the performer's lock: never in clear)."""
    return hashlib.sha256((transaction_uid or '').encode()).hexdigest()[:16]


def _parse(detail: str | None) -> dict | None:
    try:
        data = json.loads(detail or '')
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def upgrade() -> None:
    with op.batch_alter_table('worklist_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('draft_finding', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('draft_comment', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('draft_cancel_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('draft_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('draft_at', sa.DateTime(timezone=True), nullable=True))
    conn = op.get_bind()
    claims = {iid: _txn_tag(txn) for iid, txn in conn.execute(
        sa.select(items.c.id, items.c.transaction_uid).where(items.c.status == 'in_progress'))}
    drafts: dict[int, dict] = {}
    rows = conn.execute(sa.select(events.c.id, events.c.at, events.c.actor, events.c.worklist_item_id,
                                  events.c.detail).where(events.c.kind == DRAFT_EVENT).order_by(events.c.id)).all()
    for eid, at, actor, iid, detail in rows:
        data = _parse(detail)
        if data is None:
            continue  # already in the new form
        if iid in claims and data.get('txn') == claims[iid]:
            drafts[iid] = {'draft_finding': data.get('finding'), 'draft_comment': data.get('comment'),
                           'draft_cancel_reason': data.get('cancel_reason'), 'draft_by': actor, 'draft_at': at}
        line = f"item {iid}: draft saved, finding {data.get('finding') or '-'}"
        conn.execute(events.update().where(events.c.id == eid).values(detail=line))
    for iid, values in drafts.items():
        conn.execute(items.update().where(items.c.id == iid).values(**values))


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(items).where(items.c.status == 'in_progress', items.c.draft_at.isnot(None))).all()
    for r in rows:
        detail = json.dumps({'txn': _txn_tag(r.transaction_uid), 'finding': r.draft_finding,
                             'comment': r.draft_comment, 'cancel_reason': r.draft_cancel_reason})
        conn.execute(events.insert().values(at=r.draft_at, kind=DRAFT_EVENT, level='info', actor=r.draft_by,
                                            worklist_item_id=r.id, detail=detail))
    # Plain ALTER TABLE DROP COLUMN (SQLite >= 3.35): copying the table would make SQLite's ON DELETE
    # SET NULL unlink every event from its item.
    with op.batch_alter_table('worklist_items', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('draft_at')
        batch_op.drop_column('draft_by')
        batch_op.drop_column('draft_cancel_reason')
        batch_op.drop_column('draft_comment')
        batch_op.drop_column('draft_finding')
