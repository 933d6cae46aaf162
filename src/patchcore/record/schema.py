"""The record's tables, in SQLAlchemy Core: what the newest format (``FORMAT_VERSION``) holds.

Times are UTC ISO-8601 text of fixed width (``2026-12-07T07:12:03.123456Z``): they sort as
text in SQLite and PostgreSQL alike. JSON (regions, settings) is stored as text. The tables are
created and changed only by the migrations (``migrations/versions``), one revision per format.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, false

#: the newest record format this code writes; each format is one Alembic revision ("0001", "0002", ...)
FORMAT_VERSION = 2

metadata = MetaData()

#: every model that served, by its file's checksum: "which model decided" outlives the file
models = Table(
    "models", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("engine", String(40), nullable=False),
    Column("first_seen", String(32), nullable=False),
    Column("settings", Text, nullable=False),  # JSON: the model's settings
    Column("description", Text, nullable=False),  # JSON: metadata, thresholds, decision rule, calibration
)

#: one row per decision
decisions = Table(
    "decisions", metadata,
    Column("id", String(32), primary_key=True),  # uuid4 hex, made where the decision is made: replays are idempotent
    Column("time", String(32), nullable=False),
    Column("station", String(200), nullable=False),
    Column("part", String(200)),
    Column("model_name", String(200), nullable=False),
    Column("model_sha256", String(64), ForeignKey("models.sha256"), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("decision_rule", Text, nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("file_name", String(500), nullable=False),
    Column("width", Integer),
    Column("height", Integer),
    Column("score", Float, nullable=False),
    Column("normalized_score", Float, nullable=False),
    Column("decision", String(16), nullable=False),  # "anomalous" or "good"
    Column("regions", Text, nullable=False),  # JSON, as in the answer
    Column("latency_ms", Float),
    Column("engine", String(40)),
    Column("image_kept", Boolean, nullable=False, server_default=false()),  # format 2
)
Index("decisions_time", decisions.c.time)
Index("decisions_model_station_time", decisions.c.model_name, decisions.c.station, decisions.c.time)  # format 2

#: reviews by people, append-only: a decision's review is its latest row, earlier ones stay (format 2)
reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("decision_id", String(32), ForeignKey("decisions.id"), nullable=False, index=True),
    Column("time", String(32), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("verdict", String(20), nullable=False),  # "false_alarm" or "confirmed_defect"
    Column("note", Text, nullable=False, server_default=""),
)

#: images kept in the content-addressed folder, by checksum (format 2)
kept_images = Table(
    "kept_images", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("suffix", String(10), nullable=False),
    Column("nbytes", Integer, nullable=False),
    Column("kept_at", String(32), nullable=False),
)

#: what a review may say
VERDICTS = ("false_alarm", "confirmed_defect")
#: what a decision may be
DECISIONS = ("anomalous", "good")
