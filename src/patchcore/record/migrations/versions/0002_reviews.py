"""Format 2: reviews (append-only), kept images, and an index for the drift watch's and the
history's queries by model and station.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as table:
        table.add_column(sa.Column("image_kept", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index("decisions_model_station_time", "decisions", ["model_name", "station", "time"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.String(32), sa.ForeignKey("decisions.id"), nullable=False),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("verdict", sa.String(20), nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("ix_reviews_decision_id", "reviews", ["decision_id"])
    op.create_table(
        "kept_images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("suffix", sa.String(10), nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("kept_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("kept_images")
    op.drop_table("reviews")
    op.drop_index("decisions_model_station_time", "decisions")
    with op.batch_alter_table("decisions") as table:
        table.drop_column("image_kept")
