"""Group commit: decisions are written on one thread, every decision waiting when a commit ends
going into the next transaction together (so a batch spans at most one commit's time, a few
milliseconds); each caller's future resolves once the transaction holding its rows committed,
and only then does its answer go out.

When the record is a database server that stops answering, batches go to a local SQLite spool
(a record file itself) instead, and are replayed to the server once it answers again, oldest
first, each row exactly once: a row carries its id from where the decision was made, a replay
inserts only ids not there yet, and a spooled row is deleted only after the server committed it.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .images import KeptImages
from .schema import decisions, kept_images, models
from .store import RecordStore, RecordUnreachableError, days_ago, first_line

#: most decisions in one transaction
MAX_BATCH = 512
#: seconds between tries to reach the database again while spooling
REPLAY_INTERVAL_S = 1.0
#: decisions moved from the spool to the database per transaction
REPLAY_BATCH = 1000
#: seconds between retention and size-cap passes
HOUSEKEEPING_INTERVAL_S = 300.0


class RecordUnavailableError(RuntimeError):
    """A decision could not be recorded (and there is no spool to hold it)."""


@dataclass
class Batch:
    models: list[dict] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    future: Future = field(default_factory=Future)


def unreachable(error: BaseException) -> bool:
    """Whether a database error means the server is gone (spool), not that the rows are wrong."""
    return isinstance(error, (OperationalError, InterfaceError, RecordUnreachableError)) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


class RecordWriter:
    """The record's one writing thread. ``store`` is None when the database could not be
    reached at start (then everything spools until it can). ``spool`` is the local SQLite file
    for a database server; None for a SQLite record (nothing to wait for)."""

    def __init__(
        self, store: RecordStore | None, *, location: str | None = None, spool: Path | None = None, images: KeptImages | None = None,
        keep_days: float | None = None, prune_reviewed: bool = False, log: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.location = store, location
        self.spool_path = spool
        self.spool: RecordStore | None = None
        self.images, self.keep_days, self.prune_reviewed = images, keep_days, prune_reviewed
        self.log = log or (lambda message: print(f"patchcore record: {message}", file=sys.stderr, flush=True))
        self.queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.known_models: dict[str, dict] = {}  # every model row seen: spooled decisions need theirs
        self.spooling = False
        self.kept_bytes: int | None = None
        self.replayed = 0  # spooled decisions moved to the database, for the log
        self.thread = threading.Thread(target=self.run, name="patchcore-record", daemon=True)
        self.last_replay = self.last_housekeeping = 0.0
        if store is None and spool is None:
            raise RecordUnavailableError("a record writer needs a database or a spool")
        if spool is not None and (spool.exists() or store is None):
            self.open_spool()
            self.spooling = store is None or self.spool_count() > 0  # a previous run's spool is replayed first

    # --- the callers' side ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, model_rows: list[dict] = (), decision_rows: list[dict] = (), image_rows: list[dict] = ()) -> Future:
        """Queue rows; the future resolves (None) once they are committed, or raises
        :class:`RecordUnavailableError`."""
        batch = Batch(list(model_rows), list(decision_rows), list(image_rows))
        self.queue.put(batch)
        return batch.future

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop (one last try to replay the spool)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout)
        for store in (self.store, self.spool):
            if store is not None:
                store.close()

    # --- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        self.housekeeping()
        while True:
            try:
                first = self.queue.get(timeout=REPLAY_INTERVAL_S if self.spooling else HOUSEKEEPING_INTERVAL_S)
            except queue.Empty:
                first = Batch()
            batches, stopping = [first], first is None
            while not stopping and sum(len(b.decisions) for b in batches if b) < MAX_BATCH:
                try:
                    more = self.queue.get_nowait()  # everything that queued during the last commit
                except queue.Empty:
                    break
                stopping = more is None
                batches.append(more)
            work = [batch for batch in batches if batch is not None]
            if work:
                self.commit(work)
            now = time.monotonic()
            if self.spooling and (stopping or now - self.last_replay >= REPLAY_INTERVAL_S):
                self.last_replay = now
                self.replay()
            if now - self.last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
                self.housekeeping()
            if stopping:
                return

    def commit(self, batches: list[Batch]) -> None:
        model_rows = [row for batch in batches for row in batch.models]
        decision_rows = [row for batch in batches for row in batch.decisions]
        image_rows = [row for batch in batches for row in batch.images]
        for row in model_rows:
            self.known_models[row["sha256"]] = row
        if not (model_rows or decision_rows or image_rows):
            return self.resolve(batches)
        if not self.spooling:
            try:
                self.store.write(model_rows, decision_rows, image_rows)
            except Exception as error:
                if not (unreachable(error) and self.spool_path is not None):
                    return self.fail(batches, f"cannot write to the record '{self.store.where}' ({first_line(error)})")
                self.log(f"'{self.store.where}' does not answer ({first_line(error)}); spooling decisions to {self.spool_path} until it does")
                self.spooling = True
            else:
                self.resolve(batches)
                if image_rows:
                    self.enforce_cap(sum(row["nbytes"] for row in image_rows))
                return
        try:
            if self.spool is None:
                self.open_spool()
            self.spool.write(list(self.known_models.values()), decision_rows, image_rows)
        except Exception as error:
            return self.fail(batches, f"cannot write to the spool '{self.spool_path}' ({first_line(error)})")
        self.resolve(batches)

    @staticmethod
    def resolve(batches: list[Batch]) -> None:
        for batch in batches:
            if not batch.future.done():
                batch.future.set_result(None)

    @staticmethod
    def fail(batches: list[Batch], message: str) -> None:
        for batch in batches:
            if not batch.future.done():
                batch.future.set_exception(RecordUnavailableError(message))

    # --- the spool --------------------------------------------------------------------------

    def open_spool(self) -> None:
        self.spool = RecordStore.open(self.spool_path)

    def spool_count(self) -> int:
        return self.spool.count() if self.spool is not None else 0

    def replay(self) -> None:
        """Move the spool to the database, oldest first, while it answers."""
        if self.store is None:
            try:
                self.store = RecordStore.open(self.location)
            except RecordUnreachableError:
                return
        with self.spool.engine.connect() as connection:
            model_rows = [dict(row) for row in connection.execute(select(models)).mappings()]
            image_rows = [dict(row) for row in connection.execute(select(kept_images)).mappings()]
        while True:
            with self.spool.engine.connect() as connection:
                decision_rows = [dict(row) for row in connection.execute(select(decisions).order_by(decisions.c.time, decisions.c.id).limit(REPLAY_BATCH)).mappings()]
            try:
                self.store.write(model_rows, decision_rows, image_rows)
            except Exception as error:
                if not unreachable(error):
                    self.log(f"cannot replay the spool to '{self.store.where}' ({first_line(error)}); will retry")
                return
            model_rows = image_rows = []  # sent once per replay
            ids = [row["id"] for row in decision_rows]
            with self.spool.engine.begin() as connection:
                connection.execute(decisions.delete().where(decisions.c.id.in_(ids)))
                if len(decision_rows) < REPLAY_BATCH:
                    connection.execute(kept_images.delete())
            self.replayed += len(ids)
            if len(decision_rows) < REPLAY_BATCH:
                break
        self.spooling = False
        self.log(f"'{self.store.where}' answers again; {self.replayed} spooled decisions replayed")

    # --- retention and the size cap ---------------------------------------------------------

    def housekeeping(self) -> None:
        self.last_housekeeping = time.monotonic()
        if self.spooling or self.store is None:
            return
        try:
            if self.keep_days is not None:
                before = days_ago(self.keep_days)
                removed, orphans = self.store.prune(before, self.prune_reviewed)
                if self.images is not None:
                    self.images.drop(orphans)
                if removed:
                    self.log(f"removed {removed} decisions older than {self.keep_days:g} days (--keep-days)")
            if self.images is not None:
                self.kept_bytes = None  # counted afresh: other servers may share the record
                self.enforce_cap()
        except Exception as error:  # housekeeping must never stop the writing
            self.log(f"housekeeping failed ({first_line(error)}); will retry")

    def enforce_cap(self, added_bytes: int = 0) -> None:
        """Drop the oldest unreviewed kept images while over the cap. The total is counted in
        memory between passes (an image kept twice counts twice: a pass too many, never one
        too few), so that a batch under the cap costs no query."""
        if self.images is None:
            return
        if self.kept_bytes is not None:
            self.kept_bytes += added_bytes
            if self.kept_bytes <= self.images.max_bytes:
                return
        kept = self.store.kept_images()
        dropped = self.images.over_cap(kept, self.store.reviewed_image_sha256s())
        if dropped:
            self.store.forget_images(dropped)
            self.images.drop(dropped)
        gone = set(dropped)
        self.kept_bytes = sum(row["nbytes"] for row in kept if row["sha256"] not in gone)
