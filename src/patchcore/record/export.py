"""Decisions as files people use: CSV (for a spreadsheet), JSON lines, Parquet.

File names, stations and part ids come from the network: a CSV cell a spreadsheet would run as
a formula (starting ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is written with a
leading apostrophe, which spreadsheets show as text (OWASP's advice on CSV injection).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Any, Iterable

from ..errors import BadInputError

FORMATS = ("csv", "jsonl", "parquet")
#: the columns, in order; ``regions`` and ``review`` are JSON text in CSV and Parquet
COLUMNS = (
    "id", "time", "station", "part", "model_name", "model_sha256", "threshold", "decision_rule", "image_sha256", "file_name",
    "width", "height", "score", "normalized_score", "decision", "regions", "latency_ms", "engine", "image_kept",
    "review_verdict", "review_reviewer", "review_note", "review_time",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate, made plain text; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """A decision as one flat row: regions as JSON text, the latest review in four columns."""
    review = row.get("review") or {}
    values = {column: row.get(column) for column in COLUMNS[:19]}
    values["regions"] = json.dumps(row["regions"])
    for key in ("verdict", "reviewer", "note", "time"):
        values[f"review_{key}"] = review.get(key)
    return values


def write_decisions(rows: Iterable[dict[str, Any]], format_name: str, out: str | Path | None) -> int:
    """Write ``rows`` to ``out`` (None: standard output; not for Parquet) in ``format_name``.
    Returns how many were written."""
    if format_name not in FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(FORMATS)}, got {format_name!r}")
    if format_name == "parquet":
        return write_parquet(rows, out)
    handle: IO[str] = sys.stdout if out is None else open(out, "w", newline="")
    count = 0
    try:
        if format_name == "csv":
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: neutralised(value) for key, value in flat(row).items()})
                count += 1
        else:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
                count += 1
    finally:
        if out is not None:
            handle.close()
    return count


def write_parquet(rows: Iterable[dict[str, Any]], out: str | Path | None) -> int:
    if out is None:
        raise BadInputError("--format parquet needs --out FILE (Parquet is not written to a terminal)")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError("--format parquet needs pyarrow: pip install pyarrow") from None
    table = pa.Table.from_pylist([flat(row) for row in rows], schema=parquet_schema(pa))
    pq.write_table(table, out)
    return table.num_rows


def parquet_schema(pa):
    text, number = pa.string(), pa.float64()
    types = {"width": pa.int64(), "height": pa.int64(), "threshold": number, "score": number, "normalized_score": number, "latency_ms": number, "image_kept": pa.bool_()}
    return pa.schema([(column, types.get(column, text)) for column in COLUMNS])
