"""The record's database: opened by URL (SQLite by default, PostgreSQL for several servers),
upgraded in place by the migrations, refused when newer than this code; and the queries every
face shares (the history, one decision, reviews, the false alarms fed back into a model).

Rows are written by :class:`patchcore.record.writer.RecordWriter` (group commit, spooling);
:meth:`RecordStore.write` is the one transaction it runs.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine, create_engine, event, func, inspect, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, OperationalError

from ..errors import BadInputError
from .schema import DECISIONS, FORMAT_VERSION, VERDICTS, decisions, kept_images, models, reviews

MIGRATIONS = Path(__file__).parent / "migrations"
#: seconds to wait for a database to answer a connection (a line must not hang on a dead one)
CONNECT_TIMEOUT_S = 5
#: seconds a SQLite writer waits for another's lock before giving up
SQLITE_BUSY_TIMEOUT_S = 30
#: PostgreSQL advisory lock key held while migrating, so that servers starting together take turns
MIGRATION_LOCK = 2026_12_07
#: most characters of a station, part, reviewer name or note (they come from the network)
MAX_NAME_CHARS = 200
MAX_NOTE_CHARS = 2000


class RecordError(BadInputError):
    """A record that cannot be used: unreachable, not a record, or of a newer format."""


class RecordUnreachableError(RecordError):
    """The database did not answer (PostgreSQL down, a network cut)."""


def utc_now() -> str:
    """Now, as the record writes times: fixed-width UTC ISO-8601, which sorts as text."""
    return utc_text(datetime.now(timezone.utc))


def days_ago(days: float) -> str:
    return utc_text(datetime.now(timezone.utc) - timedelta(days=days))


def utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str, what: str = "time") -> str:
    """A user's ISO-8601 date or time (naive = UTC) as the record's text."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInputError(f"{what} must be an ISO-8601 date or time (e.g. 2026-12-07 or 2026-12-07T06:00:00Z), got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return utc_text(moment)


def state_dir() -> Path:
    """Where patchcore keeps its own files: $XDG_STATE_HOME/patchcore (~/.local/state/patchcore)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "patchcore"


def default_record_path() -> Path:
    """The record ``patchcore serve`` writes unless told otherwise."""
    return state_dir() / "record.sqlite"


def record_url(location: str | Path) -> URL:
    """A SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``), or a plain path for a SQLite file."""
    text_ = str(location)
    if "://" not in text_:
        return URL.create("sqlite+pysqlite", database=str(Path(text_).expanduser().resolve()))
    try:
        url = make_url(text_)
    except ArgumentError:
        raise RecordError(f"'{text_}': not a database URL (sqlite:///FILE or postgresql+psycopg://USER@HOST/DB) or a file path") from None
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg2", ""):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver patchcore[postgresql] installs
    return url


def shown(url: URL) -> str:
    """The record as messages name it: a SQLite record by its file, a server's URL never with its password."""
    path = sqlite_file(url)
    return str(path) if path is not None else url.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite record, None for a server database (or SQLite in memory)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def default_keep_dir(url: URL) -> Path | None:
    """Where kept images go unless told: beside a SQLite record (``record.sqlite.images``)."""
    path = sqlite_file(url)
    return None if path is None else path.with_name(path.name + ".images")


def first_line(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else cause.__class__.__name__


class RecordStore:
    """One record database. :meth:`open` it; every method opens its own short transaction, so
    a store is shared by threads (the writer's, the server's pool)."""

    def __init__(self, engine: Engine, url: URL) -> None:
        self.engine, self.url = engine, url
        self.where = shown(url)
        self.dialect = engine.dialect.name

    @classmethod
    def open(cls, location: str | Path | URL, *, create: bool = True) -> "RecordStore":
        """Open (and create, or upgrade in place) the record at ``location``. Raises
        :class:`RecordUnreachableError` when the database does not answer, :class:`RecordError`
        for anything else that makes it unusable, each with one line naming it and why."""
        url = location if isinstance(location, URL) else record_url(location)
        where = shown(url)
        path = sqlite_file(url)
        if path is not None:
            if path.exists() and not path.is_file():
                raise RecordError(f"'{path}': the record is not a file")
            if not path.exists():
                if not create:
                    raise RecordError(f"'{path}': no such record")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise RecordError(f"'{path}': cannot create the record's folder ({error.strerror})") from None
        try:
            engine = make_engine(url)
        except NoSuchModuleError:
            raise RecordError(f"'{where}': no database driver for {url.drivername} (pip install 'patchcore[postgresql]' for PostgreSQL)") from None
        except ModuleNotFoundError as error:
            raise RecordError(f"'{where}': the database driver is not installed ({error.name}; pip install 'patchcore[postgresql]')") from None
        store = cls(engine, url)
        try:
            with store.migration_lock(), engine.begin() as connection:
                migrate(connection, where)
        except OperationalError as error:
            engine.dispose()
            if path is not None:
                raise RecordError(f"'{where}': cannot open the record ({first_line(error)})") from None
            raise RecordUnreachableError(f"'{where}': cannot reach the record's database ({first_line(error)})") from None
        except DatabaseError as error:
            engine.dispose()
            raise RecordError(f"'{where}': not a record database ({first_line(error)})") from None
        except RecordError:
            engine.dispose()
            raise
        return store

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        """Servers starting together migrate one at a time: a lock file beside a SQLite record
        (PostgreSQL's advisory lock is taken inside the migration's transaction)."""
        path = sqlite_file(self.url)
        if path is None:
            yield
            return
        with open(path.with_name(path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self) -> None:
        self.engine.dispose()

    # --- writing (the writer's one transaction) ---------------------------------------------

    def write(self, model_rows: Sequence[dict], decision_rows: Sequence[dict], image_rows: Sequence[dict] = ()) -> None:
        """Insert models, decisions and kept images in one transaction; rows already there (by
        checksum or id) are left as they are, so a batch replayed after a crash lands once."""
        with self.engine.begin() as connection:
            for table, rows in ((models, model_rows), (kept_images, image_rows), (decisions, decision_rows)):
                if rows:
                    connection.execute(self.insert_new(table), list(rows))

    def insert_new(self, table):
        """INSERT that skips rows whose key is already there (both dialects spell it ON CONFLICT DO NOTHING)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table).on_conflict_do_nothing()

    # --- reading ----------------------------------------------------------------------------

    def decisions(
        self, *, model_name: str | None = None, model_sha256s: Sequence[str] | None = None, since: str | None = None, until: str | None = None,
        decision: str | None = None, station: str | None = None, part: str | None = None, reviewed: str | None = None,
        limit: int | None = 50, offset: int = 0, oldest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], int]:
        """Decisions that match every filter given, newest first (or oldest), a page of them,
        and how many match in all. ``reviewed``: yes, no, false_alarm or confirmed_defect (the
        latest review's verdict)."""
        if decision is not None and decision not in DECISIONS:
            raise BadInputError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        if reviewed is not None and reviewed not in ("yes", "no", *VERDICTS):
            raise BadInputError(f"reviewed must be one of yes, no, {', '.join(VERDICTS)}, got {reviewed!r}")
        latest = latest_reviews()
        conditions = []
        for column, value in ((decisions.c.model_name, model_name), (decisions.c.decision, decision), (decisions.c.station, station), (decisions.c.part, part)):
            if value is not None:
                conditions.append(column == value)
        if model_sha256s is not None:
            conditions.append(decisions.c.model_sha256.in_(list(model_sha256s)))
        if since is not None:
            conditions.append(decisions.c.time >= since)
        if until is not None:
            conditions.append(decisions.c.time < until)
        if reviewed == "yes":
            conditions.append(latest.c.verdict.is_not(None))
        elif reviewed == "no":
            conditions.append(latest.c.verdict.is_(None))
        elif reviewed is not None:
            conditions.append(latest.c.verdict == reviewed)
        joined = decisions.outerjoin(latest, latest.c.decision_id == decisions.c.id)
        order = (decisions.c.time, decisions.c.id) if oldest_first else (decisions.c.time.desc(), decisions.c.id.desc())
        query = select(decisions, latest.c.verdict, latest.c.reviewer, latest.c.note, latest.c.review_time).select_from(joined).where(*conditions).order_by(*order)
        if limit is not None:
            query = query.limit(limit).offset(offset)
        with self.engine.connect() as connection:
            rows = [decision_dict(row) for row in connection.execute(query).mappings()]
            total = connection.execute(select(func.count()).select_from(joined).where(*conditions)).scalar_one()
        return rows, int(total)

    def iter_decisions(self, batch: int = 5000, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching decision, oldest first, read a page at a time (for exports)."""
        offset = 0
        while True:
            rows, _ = self.decisions(limit=batch, offset=offset, oldest_first=True, **filters)
            yield from rows
            if len(rows) < batch:
                return
            offset += batch

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        """One decision with its reviews (oldest first), or None."""
        latest = latest_reviews()
        query = select(decisions, latest.c.verdict, latest.c.reviewer, latest.c.note, latest.c.review_time).select_from(
            decisions.outerjoin(latest, latest.c.decision_id == decisions.c.id)
        ).where(decisions.c.id == decision_id)
        with self.engine.connect() as connection:
            found = connection.execute(query).mappings().first()
            if found is None:
                return None
            row = decision_dict(found)
            history = connection.execute(select(reviews).where(reviews.c.decision_id == decision_id).order_by(reviews.c.id))
            row["reviews"] = [review_dict(review) for review in history.mappings()]
        return row

    def recent_scores(self, model_sha256: str, station: str | None, count: int) -> list[tuple[float, bool]]:
        """The last ``count`` (score, flagged) of a model at a station (all stations: None), oldest first: what seeds the drift watch."""
        query = select(decisions.c.score, decisions.c.decision).where(decisions.c.model_sha256 == model_sha256)
        if station is not None:
            query = query.where(decisions.c.station == station)
        query = query.order_by(decisions.c.time.desc(), decisions.c.id.desc()).limit(count)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [(float(score), decision == "anomalous") for score, decision in reversed(rows)]

    def stations(self, model_sha256: str) -> list[str]:
        with self.engine.connect() as connection:
            return sorted(connection.execute(select(decisions.c.station).where(decisions.c.model_sha256 == model_sha256).distinct()).scalars())

    def model(self, sha256: str) -> dict[str, Any] | None:
        """A model that served, by checksum: name, engine, first seen, settings and description."""
        with self.engine.connect() as connection:
            found = connection.execute(select(models).where(models.c.sha256 == sha256)).mappings().first()
        return None if found is None else model_dict(found)

    def models(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every model that served (of a name), oldest first."""
        query = select(models).order_by(models.c.first_seen)
        if name is not None:
            query = query.where(models.c.name == name)
        with self.engine.connect() as connection:
            return [model_dict(row) for row in connection.execute(query).mappings()]

    # --- reviews ----------------------------------------------------------------------------

    def add_review(self, decision_id: str, verdict: str, reviewer: str, note: str = "") -> dict[str, Any] | None:
        """Append a review of a decision (None if there is no such decision). A later review
        supersedes an earlier one; none is ever changed or removed."""
        if verdict not in VERDICTS:
            raise BadInputError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        reviewer = clean_text(reviewer, "reviewer", MAX_NAME_CHARS)
        if not reviewer:
            raise BadInputError("a review needs the reviewer's name")
        note = clean_text(note or "", "note", MAX_NOTE_CHARS)
        row = {"decision_id": decision_id, "time": utc_now(), "reviewer": reviewer, "verdict": verdict, "note": note}
        with self.engine.begin() as connection:
            if connection.execute(select(decisions.c.id).where(decisions.c.id == decision_id)).first() is None:
                return None
            row["id"] = connection.execute(reviews.insert().values(**row)).inserted_primary_key[0]
        return review_dict(row)

    def reviewed_image_sha256s(self) -> set[str]:
        """Images of decisions someone reviewed: the kept images a size cap never drops."""
        with self.engine.connect() as connection:
            query = select(decisions.c.image_sha256).where(decisions.c.id.in_(select(reviews.c.decision_id))).distinct()
            return set(connection.execute(query).scalars())

    # --- kept images and retention ----------------------------------------------------------

    def kept_images(self) -> list[dict[str, Any]]:
        """Every kept image, oldest first."""
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(select(kept_images).order_by(kept_images.c.kept_at, kept_images.c.sha256)).mappings()]

    def forget_images(self, sha256s: Sequence[str]) -> None:
        """Images dropped from the folder: their rows go, their decisions say the image is not kept."""
        if not sha256s:
            return
        with self.engine.begin() as connection:
            connection.execute(update(decisions).where(decisions.c.image_sha256.in_(list(sha256s))).values(image_kept=False))
            connection.execute(kept_images.delete().where(kept_images.c.sha256.in_(list(sha256s))))

    def prune(self, before: str, include_reviewed: bool = False) -> tuple[int, list[str]]:
        """Remove decisions older than ``before`` (never reviewed ones unless asked, and then
        their reviews with them). Returns how many went, and the checksums of kept images no
        decision uses any more (for the folder to drop)."""
        with self.engine.begin() as connection:
            old = select(decisions.c.id).where(decisions.c.time < before)
            if not include_reviewed:
                old = old.where(decisions.c.id.not_in(select(reviews.c.decision_id)))
            ids = list(connection.execute(old).scalars())
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                connection.execute(reviews.delete().where(reviews.c.decision_id.in_(chunk)))
                connection.execute(decisions.delete().where(decisions.c.id.in_(chunk)))
            orphans = list(connection.execute(select(kept_images.c.sha256).where(kept_images.c.sha256.not_in(select(decisions.c.image_sha256)))).scalars())
            if orphans:
                connection.execute(kept_images.delete().where(kept_images.c.sha256.in_(orphans)))
        return len(ids), orphans

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(decisions)).scalar_one())


def make_engine(url: URL) -> Engine:
    """An engine with the settings a record needs: WAL and full sync for a SQLite file (an
    answered decision is on disk), a connection timeout and liveness checks for a server."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def sqlite_settings(connection, _record) -> None:
            cursor = connection.cursor()
            # WAL: readers (the history, drift) never block the writer. FULL: each commit is
            # fsynced, so a power cut loses no answered decision (NORMAL could lose the last ones).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(connection: Connection, where: str) -> None:
    """Bring the record to the newest format in place (every row kept), or refuse it."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    config = alembic_config(connection)
    scripts = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
        if tables:
            raise RecordError(f"'{where}': not a patchcore record (it holds other tables: {', '.join(sorted(tables)[:5])})")
    else:
        try:
            scripts.get_revision(current)
        except Exception:
            version = int(current) if current.isdigit() else None
            what = f"format {version}" if version is not None else f"revision {current!r}"
            raise RecordError(f"'{where}': the record is {what}, newer than this patchcore reads (formats 1 to {FORMAT_VERSION}); upgrade patchcore") from None
    if current != scripts.get_current_head():
        command.upgrade(config, "head")


def format_version(store: RecordStore) -> int:
    """The record's format (its migration revision as a number)."""
    with store.engine.connect() as connection:
        return int(MigrationContext.configure(connection).get_current_revision())


def latest_reviews():
    """Each reviewed decision's latest review (the highest id: reviews are only ever appended)."""
    newest = select(reviews.c.decision_id, func.max(reviews.c.id).label("review_id")).group_by(reviews.c.decision_id).subquery()
    return (
        select(reviews.c.decision_id, reviews.c.verdict, reviews.c.reviewer, reviews.c.note, reviews.c.time.label("review_time"))
        .join(newest, newest.c.review_id == reviews.c.id)
        .subquery()
    )


def decision_dict(row: Any) -> dict[str, Any]:
    """A decision as the faces show it: regions parsed, the latest review (or None)."""
    values = {column.name: row[column.name] for column in decisions.columns}
    values["regions"] = json.loads(values["regions"])
    values["image_kept"] = bool(values["image_kept"])
    verdict = row.get("verdict")
    values["review"] = None if verdict is None else {"verdict": verdict, "reviewer": row["reviewer"], "note": row["note"], "time": row["review_time"]}
    return values


def review_dict(row: Any) -> dict[str, Any]:
    return {key: row[key] for key in ("id", "decision_id", "time", "reviewer", "verdict", "note")}


def model_dict(row: Any) -> dict[str, Any]:
    values = dict(row)
    values["settings"] = json.loads(values["settings"])
    values["description"] = json.loads(values["description"])
    return values


def clean_text(value: Any, what: str, limit: int) -> str:
    """A name or note from the network: a string, printable, within its length."""
    if not isinstance(value, str):
        raise BadInputError(f"{what} must be text")
    if len(value) > limit:
        raise BadInputError(f"{what} is {len(value)} characters, more than {limit}")
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
        raise BadInputError(f"{what} holds control characters")
    return value.strip()
