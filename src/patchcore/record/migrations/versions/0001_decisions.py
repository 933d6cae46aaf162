"""Format 1: the models that served and one row per decision.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("engine", sa.String(40), nullable=False),
        sa.Column("first_seen", sa.String(32), nullable=False),
        sa.Column("settings", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("part", sa.String(200)),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_sha256", sa.String(64), sa.ForeignKey("models.sha256"), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("decision_rule", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("file_name", sa.String(500), nullable=False),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("normalized_score", sa.Float, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("regions", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float),
        sa.Column("engine", sa.String(40)),
    )
    op.create_index("decisions_time", "decisions", ["time"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("models")
