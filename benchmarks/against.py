"""An old commit against the working tree, measured interleaved in one run: the machinery behind
``benchmarks/speed.py --against COMMIT`` and ``benchmarks/search.py --against COMMIT``.

- the old commit is checked out with ``git worktree add --detach`` into a temporary folder, and the
  working tree's ``src/`` (uncommitted and untracked files included) is copied beside it at the
  start, so that edits made to the working tree during the run do not mix into it; both are
  removed at the end, also on an error or Ctrl-C;
- every measurement runs in a fresh child process of the benchmark script (the working tree's
  copy of it, the same measuring code for both), with ``PYTHONPATH=<tree>/src`` and its working
  folder in that tree, so that ``import patchcore`` takes that tree's code: the child reports
  ``patchcore.__file__`` and the run stops if it is not under the tree meant;
- the rounds alternate: old, new, old, new, ... so that a slow spell of the shared machine
  lands on both; each quantity's figure is the median over the rounds, and the ratio is
  new / old; a gated quantity passes when the ratio is within ``1 +- tolerance``;
- outputs the children write (``.npy`` arrays) are compared exactly: between the two commits
  (first round of each) and, per commit, between its rounds (repeatability).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from provenance import REPO, commit_state, git, now, provenance, stamped

SIDES = ("old", "new")


def tree_digest(src: Path) -> str:
    """sha256 over the .py files under ``src`` (names and bytes): says whether the code changed."""
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class Trees:
    """The old commit (a detached git worktree) and a copy of the working tree's src/, in a temporary folder."""

    def __init__(self, spec: str, label: str) -> None:
        self.spec, self.label = spec, label
        try:
            self.old_commit = git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
        except subprocess.CalledProcessError:
            raise SystemExit(f"--against {spec}: not a commit of this repository") from None
        self.short = git("rev-parse", "--short", self.old_commit)
        self.root: Path | None = None

    def __enter__(self) -> "Trees":
        self.root = Path(tempfile.mkdtemp(prefix=f"patchcore-{self.label}-vs-{self.short}-"))
        try:
            self.date = now()
            self.new_state = commit_state()
            untracked = git("ls-files", "--others", "--exclude-standard", "--", "src").splitlines()
            if untracked:
                self.new_state["untracked_files"] = untracked
            shutil.copytree(REPO / "src", self.root / "new" / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            self.new_digest = tree_digest(self.root / "new" / "src")
            subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(self.root / "old"), self.old_commit], cwd=REPO, check=True)
            self.paths = {"old": self.root / "old", "new": self.root / "new"}
            self.scratch = self.root / "scratch"
            self.scratch.mkdir()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.root is None:
            return
        if (self.root / "old").exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(self.root / "old")], cwd=REPO, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
        self.root = None

    def describe(self) -> dict:
        return {
            "old": {"commit": self.old_commit, "source": f"git worktree add --detach {self.old_commit} (clean checkout)"},
            "new": {**self.new_state, "source": "a copy of the working tree's src/ at the start of the run (uncommitted and untracked files included)",
                    "src_sha256": self.new_digest},  # of the copy's .py files (tree_digest)
        }


def child_env(tree: Path) -> dict[str, str]:
    """This process's environment for a child that imports patchcore from ``tree``/src."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(tree / "src")
    return env


def run_child(script: Path, tree: Path, job: dict, timeout: float = 1800) -> dict:
    """``script --against-child JOB`` in a fresh process that imports patchcore from ``tree``/src."""
    done = subprocess.run([sys.executable, str(script), "--against-child", json.dumps(job)], cwd=tree, env=child_env(tree), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"child in {tree} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = (tree / "src").resolve()
    if not Path(result["patchcore_file"]).resolve().is_relative_to(expected):
        raise RuntimeError(f"the child imported patchcore from {result['patchcore_file']}, not from {expected}")
    return result


def interleave(rounds: int, measure: Callable[[str, int], dict], report: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """``measure(side, round)`` for old, new, old, new, ...: each side's results in round order."""
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for number in range(rounds):
        for side in SIDES:
            started = time.perf_counter()
            results[side].append(measure(side, number))
            figures = results[side][-1]["figures"]
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(figures.items())[:4])
            report(f"  round {number + 1}/{rounds}, {side}: {shown} ({time.perf_counter() - started:.0f} s)")
    return results


def summarise(results: dict[str, list[dict]], gated: dict[str, str], tolerance: float) -> tuple[dict, bool]:
    """Per quantity: each round's figure, the medians, new/old and whether it is within tolerance.

    ``gated`` names the quantities the verdict rests on, each with the better direction ("lower"
    or "higher"); the others are reported only."""
    names = [name for name in results["old"][0]["figures"] if all(name in r["figures"] for side in SIDES for r in results[side])]
    quantities = {}
    for name in names:
        rounds = {side: [r["figures"][name] for r in results[side]] for side in SIDES}
        medians = {side: statistics.median(values) for side, values in rounds.items()}
        ratio = medians["new"] / medians["old"] if medians["old"] else float("nan")
        entry = {"old": rounds["old"], "new": rounds["new"], "old_median": medians["old"], "new_median": medians["new"],
                 "ratio_new_over_old": ratio, "within_tolerance": abs(ratio - 1) <= tolerance, "gated": name in gated,
                 # each round's new over the old just before it (the interleaved pairs)
                 "paired_ratios": [n / o if o else float("nan") for o, n in zip(rounds["old"], rounds["new"])]}
        if name in gated:
            # the best round of each (noise on a shared machine only ever makes a round worse): shown, not judged
            best = min if gated[name] == "lower" else max
            entry.update(better=gated[name], old_best=best(rounds["old"]), new_best=best(rounds["new"]))
            entry["ratio_of_best"] = entry["new_best"] / entry["old_best"] if entry["old_best"] else float("nan")
        quantities[name] = entry
    missing = [name for name in gated if name not in quantities]
    passed = not missing and all(q["within_tolerance"] for q in quantities.values() if q["gated"])
    return quantities, passed


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"identical": False, "shapes": [list(a.shape), list(b.shape)]}
    same = bool(np.array_equal(a, b)) and a.dtype == b.dtype
    difference = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return {"identical": same, "max_abs_difference": difference, "shape": list(a.shape)}


def compare_outputs(folders: dict[str, list[Path]]) -> dict:
    """Each .npy array the children wrote: old against new (the first folder of each side holding
    it), and per side its later copies against that first (repeatability)."""
    names = sorted({p.name for side in SIDES for folder in folders[side] for p in folder.glob("*.npy")})
    between, repeat = {}, {side: {} for side in SIDES}
    for name in names:
        held = {side: [folder / name for folder in folders[side] if (folder / name).is_file()] for side in SIDES}
        key = name.removesuffix(".npy")
        if all(held.values()):
            between[key] = compare_arrays(np.load(held["old"][0]), np.load(held["new"][0]))
        for side in SIDES:
            if len(held[side]) > 1:
                reference = np.load(held[side][0])
                checks = [compare_arrays(reference, np.load(path)) for path in held[side][1:]]
                repeat[side][key] = {"identical": all(c["identical"] for c in checks),
                                     "max_abs_difference": max(c.get("max_abs_difference", float("inf")) for c in checks)}
    return {"identical": bool(between) and all(c["identical"] for c in between.values()), "old_vs_new": between, "repeatable_within_commit": repeat}


def comparison(script: str, trees: Trees, args_tolerance: float, rounds: int, results: dict, quantities: dict, passed: bool, outputs: dict,
               seconds: float, notes: list[str], extra: dict | None = None) -> dict:
    """The results file's content: provenance of both commits, per-round figures, medians, ratios, verdict."""
    fields = provenance()  # the command and the machine
    fields.update({key: trees.new_state[key] for key in ("commit", "dirty")}, date=trees.date)
    fields.pop("changed_files", None)
    if "changed_files" in trees.new_state:
        fields["changed_files"] = trees.new_state["changed_files"]
    body = {
        "against": trees.spec, "against_commit": trees.old_commit, "against_dirty": False,
        "trees": trees.describe(),
        "patchcore_imported_from": {side: sorted({r["patchcore_file"] for r in results[side]}) for side in SIDES},
        "order": "interleaved: old, new, old, new, ... one fresh process each",
        "rounds": rounds, "tolerance": args_tolerance,
        "verdict": "PASS" if passed else "FAIL",
        "verdict_rule": f"every gated quantity's new/old median ratio within 1 +- {args_tolerance:g}",
        "quantities": quantities,
        "outputs": outputs,
        "notes": notes,
        "seconds": seconds,
        **(extra or {}),
    }
    return stamped(fields, body)


def lines(result: dict, title: str) -> list[str]:
    """The printed (and .md) report."""
    old, new = result["against_commit"], result["commit"]
    dirty = " + uncommitted changes" if result["dirty"] else ""
    out = [
        f"# {title}: {new[:10]}{dirty} (new) against {old[:10]} (old, `--against {result['against']}`)", "",
        f"`{result['command']}`, {result['date']}, {result['rounds']} interleaved rounds, {result['seconds'] / 60:.1f} min in all.", "",
        "| quantity | old, per round | new, per round | old median | new median | **new / old** (medians) | within tolerance | new / old per round | best new / best old |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, q in result["quantities"].items():
        label = f"**{name}**" if q["gated"] else name
        rounds = {side: ", ".join(f"{v:.4g}" for v in q[side]) for side in SIDES}
        within = ("yes" if q["within_tolerance"] else f"**NO** ({_direction(q)})") if q["gated"] else ("yes" if q["within_tolerance"] else "no") + " (not gated)"
        paired = ", ".join(f"{v:.3f}" for v in q["paired_ratios"])
        best = f"{q['ratio_of_best']:.3f}" if "ratio_of_best" in q else "-"
        out.append(f"| {label} | {rounds['old']} | {rounds['new']} | {q['old_median']:.4g} | {q['new_median']:.4g} | {q['ratio_new_over_old']:.3f} | {within} | {paired} | {best} |")
    o = result["outputs"]
    out += ["", f"Outputs bit-identical between the commits: **{'yes' if o['identical'] else 'NO'}**"]
    for name, c in o["old_vs_new"].items():
        detail = f"max abs difference {c['max_abs_difference']:.3g}" if "max_abs_difference" in c else f"shapes {c['shapes']}"
        out.append(f"- {name}: {'identical' if c['identical'] else 'DIFFERENT'} ({detail})")
    for side in SIDES:
        repeat = o["repeatable_within_commit"][side]
        if repeat:
            out.append(f"- {side} commit, its later rounds against its first: " + ", ".join(f"{k} {_same(v)}" for k, v in repeat.items()))
    out += ["", *[f"- {note}" for note in result["notes"]], "",
            f"**{result['verdict']}**: {result['verdict_rule']} (gated quantities in bold)."]
    return out


def _direction(q: dict) -> str:
    """Whether the new commit's median is the better or the worse one (a gated quantity)."""
    ratio = q["ratio_new_over_old"]
    return "new better" if (ratio < 1) == (q["better"] == "lower") else "new worse"


def _same(check: dict) -> str:
    return "identical" if check["identical"] else f"differ by up to {check['max_abs_difference']:.3g}"


def write(result: dict, out: Path, stem: str, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines(result, title)) + "\n")
    return path
