"""study_scores: what each model and calibration made of each study, kept as predictions are recorded

``/api/stats`` and its weekly figures count studies (flagged, scored negative, RIS-labelled, read)
per model and calibration, in total, over a window and per week.  Grouping every prediction by study on each request
grew with the history; one row per study and (model, calibration), moved forward when a
prediction is recorded, with its image counts, makes those counts a scan of one index.  Filled from the predictions.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'study_scores',
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.String(length=64), nullable=False),
        sa.Column('calibration', sa.String(length=32), nullable=False),
        sa.Column('first_scored_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_scored_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('first_positive_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_positive_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_shadow_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('positive_images', sa.Integer(), nullable=False),
        sa.Column('shadow_images', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_study_scores_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('study_id', 'model_id', 'calibration', name=op.f('pk_study_scores')),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_study_scores_model', 'study_scores',
                    ['model_id', 'calibration', 'last_scored_at', 'last_positive_at', 'last_shadow_at', 'images',
                     'positive_images', 'shadow_images'])
    op.execute(
        "INSERT INTO study_scores (study_id, model_id, calibration, first_scored_at, last_scored_at, "
        "first_positive_at, last_positive_at, last_shadow_at, images, positive_images, shadow_images) "
        "SELECT series.study_id, p.model_id, p.calibration, min(p.created_at), max(p.created_at), "
        "min(CASE WHEN p.positive THEN p.created_at END), max(CASE WHEN p.positive THEN p.created_at END), "
        "max(CASE WHEN p.shadow THEN p.created_at END), "
        "count(*), sum(CASE WHEN p.positive THEN 1 ELSE 0 END), sum(CASE WHEN p.shadow THEN 1 ELSE 0 END) "
        "FROM predictions p JOIN instances ON instances.id = p.instance_id "
        "JOIN series ON series.id = instances.series_id "
        "GROUP BY series.study_id, p.model_id, p.calibration")


def downgrade() -> None:
    op.drop_index('ix_study_scores_model', table_name='study_scores')
    op.drop_table('study_scores')
