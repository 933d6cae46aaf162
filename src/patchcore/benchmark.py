"""The seed's MVTec AD tables: every category under a root, one row per backbone."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .backbones import WeightsError
from .data import BadInputError, training_images
from .evaluate import evaluate
from .model import PatchCore

#: the seed's three tables, then our calibrated-threshold F1
TABLES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "image_f1_max": "Image F1 (best threshold on test, as the seed reports)",
    "image_f1": "Image F1 (threshold calibrated on good images only)",
}


def find_categories(root: str | Path) -> list[Path]:
    """Category folders under an MVTec AD root: those with ``train/good`` and ``test``."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"'{root}': not a folder")
    categories = sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir() and (p / "test").is_dir())
    if not categories:
        raise BadInputError(f"'{root}': no category folders with train/good and test inside (MVTec AD layout)")
    return categories


def run_benchmark(
    root: str | Path,
    backbones: list[str],
    out_dir: str | Path,
    model_options: dict[str, Any],
    weights: dict[str, str],
    pictures: bool = False,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """Fit and test every (backbone, category); a backbone that cannot run is an error row, not a crash."""
    out_dir = Path(out_dir)
    categories = find_categories(root)
    results: dict[str, dict[str, Any]] = {}
    for backbone in backbones:
        results[backbone] = {}
        for category in categories:
            run_dir = out_dir / backbone / category.name
            report(f"{backbone} / {category.name}")
            started = time.perf_counter()
            try:
                model = PatchCore(backbone, weights=weights.get(backbone), **model_options)
                model.fit(training_images(category))
                fit_seconds = time.perf_counter() - started
                model.save(run_dir / "model.safetensors")
                metrics = evaluate(model, category, run_dir, pictures=pictures, report=report)
                kept = (*TABLES, "pixel_aupro", "good_flagged_rate", "defects_missed_rate", "images_per_second")
                results[backbone][category.name] = {key: metrics[key] for key in kept} | {"fit_seconds": fit_seconds}
            except (WeightsError, BadInputError, ValueError) as error:
                report(f"{backbone} / {category.name}: {error}")
                results[backbone][category.name] = {"error": str(error)}
                if isinstance(error, WeightsError):  # the same for every category: say it once per row
                    for rest in categories:
                        results[backbone].setdefault(rest.name, {"error": str(error)})
                    break
    names = [c.name for c in categories]
    summary = {"root": str(root), "categories": names, "results": results, "tables": {key: _table_rows(results, names, key) for key in TABLES}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "benchmark.md").write_text(markdown_tables(summary))
    return summary


def _table_rows(results: dict[str, dict[str, Any]], categories: list[str], key: str) -> dict[str, dict[str, float | str | None]]:
    rows = {}
    for backbone, per_category in results.items():
        cells: dict[str, float | str | None] = {}
        values = []
        for name in categories:
            cell = per_category.get(name, {})
            if "error" in cell:
                cells[name] = "error"
            else:
                cells[name] = cell.get(key)
                values.append(cell.get(key))
        usable = [v for v in values if v is not None]
        cells = {"Avg": (sum(usable) / len(usable)) if usable and len(usable) == len(categories) else None, **cells}
        rows[backbone] = cells
    return rows


def markdown_tables(summary: dict[str, Any]) -> str:
    """One Markdown table per metric: a row per backbone, columns Avg then each category."""
    header = ["", "Avg", *summary["categories"]]
    parts = []
    for key, title in TABLES.items():
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for backbone, cells in summary["tables"][key].items():
            shown = [_cell(cells[column]) for column in header[1:]]
            lines.append(f"| {backbone} | " + " | ".join(shown) + " |")
        parts.append("\n".join(lines))
    errors = [
        f"- {backbone}: {message}"
        for backbone, per_category in summary["results"].items()
        for message in dict.fromkeys(cell["error"] for cell in per_category.values() if "error" in cell)
    ]
    if errors:
        parts.append("## Errors\n\n" + "\n".join(errors))
    return "\n\n".join(parts) + "\n"


def _cell(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"
