"""Where a benchmark's figures come from: the commit, the command, the machine and the date.

Every script in benchmarks/ puts these fields at the top of its results JSON::

    from provenance import provenance, stamped
    fields = provenance()                      # at the start of the run: sys.argv[1:]
    results = stamped(fields, {...figures...})  # the four fields first, then the figures

- ``commit``: the 40-hex commit checked out (``git rev-parse HEAD``), and ``dirty``: whether
  tracked files under ``src/`` or ``benchmarks/*.py`` differed from it (staged or not; results
  files and docs do not count), with ``changed_files`` listing them when they did;
- ``command``: the command line as typed (interpreter included, from ``sys.orig_argv``);
- ``machine``: ``{"cpu", "cores", "memory_gb", "python", "torch", ...}`` (torch, its thread count
  and the GPU when torch is importable; a script adds versions of its own, e.g. onnxruntime);
- ``date``: UTC, ``2026-12-07 03:28 UTC``.

``python benchmarks/provenance.py --backfill [--dry-run]`` adds the fields to results files
written before this module existed, from git history (see :func:`backfill`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: the code whose changes make a run "dirty" (git pathspecs, relative to the repository)
CODE = ("src", ":(glob)benchmarks/*.py")
FIELDS = ("commit", "dirty", "command", "machine", "date")


def git(*arguments: str, repo: Path = REPO) -> str:
    return subprocess.run(["git", *arguments], cwd=repo, capture_output=True, text=True, check=True).stdout.rstrip("\n")


def commit_state(repo: Path = REPO) -> dict:
    """``{"commit": HEAD, "dirty": bool}``, and ``changed_files`` when tracked code differs from HEAD."""
    head = git("rev-parse", "HEAD", repo=repo)
    status = git("status", "--porcelain=v1", "--untracked-files=no", "--", *CODE, repo=repo)
    changed = [line[3:] for line in status.splitlines() if line.strip()]  # "XY path"
    state: dict = {"commit": head, "dirty": bool(changed)}
    if changed:
        state["changed_files"] = changed
    return state


def command(argv: list[str] | None = None) -> str:
    """The command line: the interpreter and script as typed, then ``argv`` (default: this run's arguments)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    original = list(getattr(sys, "orig_argv", []))
    # sys.orig_argv = interpreter, its options, the script (or -m module), then sys.argv[1:]
    prefix = original[: len(original) - len(sys.argv) + 1] if len(original) >= len(sys.argv) else [sys.executable, sys.argv[0]]
    return shlex.join([*prefix, *arguments])


def machine(**extra: object) -> dict:
    """CPU model, cores, memory, Python and (when importable) torch; ``extra`` adds keys (library versions)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor() or platform.machine())
    memory_gb = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), None)
        memory_gb = None if total_kb is None else round(total_kb / 2**20, 1)
    info: dict = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        pass
    else:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info.update(extra)
    return info


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def provenance(argv: list[str] | None = None, **machine_extra: object) -> dict:
    """The results file's provenance fields: commit, dirty (and changed_files), command, machine, date."""
    return {**commit_state(), "command": command(argv), "machine": machine(**machine_extra), "date": now()}


#: every key this module writes at the top of a results file (an earlier run's are dropped on rewriting)
PROVENANCE_KEYS = {*FIELDS, "changed_files", "provenance", "command_source"}


def stamped(fields: dict, results: dict) -> dict:
    """``results`` with the provenance ``fields`` first, replacing those of an earlier run it may carry."""
    return {**fields, **{key: value for key, value in results.items() if key not in fields and key not in PROVENANCE_KEYS}}


def short(fields: dict) -> dict:
    """The fields that say which code ran and how (for a section of a results file kept across runs)."""
    return {key: fields[key] for key in ("commit", "dirty", "changed_files", "command", "date") if key in fields}


def headline(results: dict) -> str:
    """`command` at commit C(+changes), date: for a markdown report."""
    if "commit" not in results:
        return f"`{results.get('command', 'command not recorded')}`"
    changes = "+changes" if results.get("dirty") else ""
    return f"`{results.get('command')}` at commit {results['commit'][:12]}{changes}, {results.get('date', 'date not recorded')}"


def describe(machine_info: dict | str | None) -> str:
    """One line for a markdown report (old results files hold the machine as a string)."""
    if not isinstance(machine_info, dict):
        return str(machine_info)
    if machine_info.get("cpu") is None and "recorded_as" in machine_info:  # backfilled: what the run recorded, as it recorded it
        return machine_info["recorded_as"] or "machine not recorded"
    m = machine_info
    parts = [m.get("cpu") or "CPU model not recorded"]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("memory_gb"):
        parts.append(f"{m['memory_gb']} GB")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    known = {"cpu", "cores", "memory_gb", "python", "arch", "recorded_as", "torch_threads", "gpu"}
    parts += [f"{key} {value}" for key, value in m.items() if key not in known and value is not None]
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} torch threads")
    if "gpu" in m:
        parts.append(f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Backfill: results files written before this module


BACKFILL_NOTE = "backfilled from git history on 2026-12-07; measured on the working tree of that commit"
PLAIN = "the script's plain invocation: no command line is recorded in the file, its .md or the README"
#: the command of each results file without one: (command, where it comes from)
COMMANDS = {
    "anomalib_2_7.json": (".venv/bin/python benchmarks/speed.py --anomalib --skip-scale",
                          "README.md (Performance) and the message of the commit that wrote the file; speed.py --anomalib writes this file"),
    "bank_size.json": (".venv/bin/python benchmarks/bank_size.py",
                       PLAIN + " (the file's 'command' was a description of the procedure, now 'procedure'); its sets and sizes are the defaults"),
    "calibration_mobilenet_v2.json": ("benchmarks/calibration.py --backbone mobilenet_v2 --folds 5", "calibration_mobilenet_v2.md"),
    "export_large.json": (".venv/bin/python benchmarks/export_large.py", PLAIN + "; whether --model was given is not recorded"),
    "export_parity.json": (".venv/bin/python benchmarks/export_parity.py --model /tmp/sl/bottle.safetensors",
                           "the script's invocation with the 'model' the file records (/tmp/sl/bottle.safetensors), which only --model "
                           "gives (without it the model is fitted into /tmp/export_parity.*/); other options not recorded"),
    "export_speed.json": (".venv/bin/python benchmarks/export_speed.py", PLAIN + "; whether --model was given is not recorded"),
    "pixel_metrics.json": (".venv/bin/python benchmarks/pixel_metrics.py", "README.md"),
    "quality_mobilenet_v2.json": (".venv/bin/python benchmarks/quality.py",
                                  "README.md (Results); the file's 'command' was the per-set `patchcore train` line, now 'procedure'"),
    "ray_overhead.json": ("benchmarks/ray_overhead.py --only fit",
                          "README.md and the message of the commit that last wrote the file (its fit section); the predict and network "
                          "sections were kept from an earlier run: see 'sections'"),
    "runtime_install.json": (".venv/bin/python benchmarks/runtime_install.py", PLAIN),
    "speed.json": (".venv/bin/python benchmarks/speed.py --anomalib --skip-scale",
                   "README.md (Performance) and the message of the commit that wrote the file (speed.md's `.venv/bin/python "
                   "benchmarks/speed.py` is fixed text, whatever the options); 'scale' was kept from an earlier run (--skip-scale)"),
}
#: files whose 'command' is a description of the procedure rather than the command that wrote them
PROCEDURE_AS_COMMAND = {"bank_size.json", "quality_mobilenet_v2.json"}


def parse_machine(text: str | None) -> dict:
    """The object form of an old machine string such as 'x86_64, 2 CPU cores, torch 2.14.1+cu130, CPU only'.

    Only what the string says: the CPU model, memory and Python were not recorded (None)."""
    info: dict = {"cpu": None, "cores": None, "memory_gb": None, "python": None}
    if not text:
        info["recorded_as"] = None
        return info
    for part in (p.strip() for p in text.split(",")):
        if match := re.fullmatch(r"(\d+) CPU cores", part):
            info["cores"] = int(match[1])
        elif match := re.fullmatch(r"(?:threads (\d+)|(\d+) threads)", part):
            info["torch_threads"] = int(match[1] or match[2])
        elif part == "CPU only":
            info["gpu"] = None
        elif part.startswith("CUDA"):
            info["gpu"] = part.removeprefix("CUDA").strip() or "CUDA (device not named)"
        elif match := re.fullmatch(r"(torch|onnxruntime|openvino|ray) (\S+)", part):
            info[match[1]] = match[2]
        elif re.fullmatch(r"x86_64|aarch64|arm64|i[3-6]86", part):
            info["arch"] = part
    info["recorded_as"] = text
    return info


def last_commit(path: Path) -> tuple[str, str]:
    """The commit that last wrote ``path`` and its date (UTC)."""
    line = git("log", "-1", "--format=%H %ct", "--", str(path.relative_to(REPO)))
    if not line:
        raise ValueError(f"{path} has no commit: not backfilled")
    commit, stamp = line.split()
    return commit, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(stamp)))


def backfilled(path: Path, data: dict) -> dict | None:
    """The file's data with the provenance fields added, or None if it has them all already."""
    if all(key in data for key in FIELDS) and isinstance(data["machine"], dict):
        return None
    name = path.name
    if "commit" in data and re.fullmatch(r"[0-9a-f]{40}(\+changes)?", str(data["commit"])):
        # Recorded at run time by hostile_load.py, which appended '+changes' when any tracked
        # file outside benchmarks/results differed (a wider test than 'dirty'): without it the
        # code was clean; with it, whether the code (not docs or tests) differed is unknown.
        recorded = data["commit"]
        fields = {"commit": recorded.removesuffix("+changes"), "dirty": None if recorded.endswith("+changes") else False}
        fields.update({key: data[key] for key in ("command", "date") if key in data})
        fields["machine"] = data["machine"] if isinstance(data.get("machine"), dict) else parse_machine(data.get("machine"))
        note = ("'dirty' added on 2026-12-07 from the recorded commit: hostile_load.py then appended '+changes' to it when any "
                "tracked file outside benchmarks/results differed from HEAD, and it did not")
        if recorded.endswith("+changes"):
            note = "'dirty' unknown: the recorded commit carried '+changes' (some tracked file, code or not, differed from HEAD)"
        return stamped({**fields, "provenance": note}, data)
    commit, date = last_commit(path)
    if name not in COMMANDS and "command" not in data:
        raise ValueError(f"{name}: no command recorded and none known: add it to COMMANDS")
    if "command" in data and name not in PROCEDURE_AS_COMMAND:
        command_line, source = data["command"], "the file"
    else:
        command_line, source = COMMANDS[name]
    recorded_machine = data.get("machine")
    if name == "anomalib_2_7.json" and recorded_machine is None:
        # its 'source': "benchmarks/speed.py --anomalib, DATE, MACHINE"
        recorded_machine = data.get("source", "").split(", ", 2)[-1] if data.get("source", "").count(", ") >= 2 else None
    fields = {
        "commit": commit, "dirty": None, "command": command_line,
        "machine": recorded_machine if isinstance(recorded_machine, dict) else parse_machine(recorded_machine),
        "date": date, "provenance": BACKFILL_NOTE + "; 'dirty' not recorded", "command_source": source,
    }
    rest = dict(data)
    if name in PROCEDURE_AS_COMMAND and "command" in rest:
        rest = {("procedure" if key == "command" else key): value for key, value in rest.items()}
    if name == "ray_overhead.json":
        fields["sections"] = ray_sections(path, commit, date)
    return stamped(fields, rest)


def ray_sections(path: Path, fit_commit: str, fit_date: str) -> dict:
    """ray_overhead.json's sections: fit from the last commit (--only fit), predict and network from
    the commit before it that wrote the file (they were kept from that run)."""
    lines = git("log", "--format=%H %ct", "--", str(path.relative_to(REPO))).splitlines()
    earlier = [line.split() for line in lines if not line.startswith(fit_commit)]
    sections = {"fit": {"commit": fit_commit, "dirty": None, "command": "benchmarks/ray_overhead.py --only fit", "date": fit_date,
                        "command_source": "README.md and the message of the commit"}}
    if earlier:
        commit, stamp = earlier[0]
        sections["predict"] = sections["network"] = {
            "commit": commit, "dirty": None, "command": ".venv/bin/python benchmarks/ray_overhead.py",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(stamp))), "command_source": PLAIN + " (its images, all 292, are the default)",
        }
    return sections


def backfill(dry_run: bool = False) -> list[str]:
    """Add the provenance fields to every results JSON lacking them; returns what was done, a line a file."""
    done = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            done.append(f"{path.name}: not an object, skipped")
            continue
        new = backfilled(path, data)
        if new is None:
            done.append(f"{path.name}: has its provenance already")
            continue
        if not dry_run:
            path.write_text(json.dumps(new, indent=2) + "\n")
        done.append(f"{path.name}: commit {new['commit'][:10]} ({new['date']}), dirty {new['dirty']}, command `{new['command']}`")
    return done


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backfill", action="store_true", help="add the fields to results files lacking them, from git history")
    parser.add_argument("--dry-run", action="store_true", help="with --backfill: say what would be written, write nothing")
    options = parser.parse_args()
    if options.backfill:
        print("\n".join(backfill(options.dry_run)))
    else:
        print(json.dumps(provenance(), indent=2))
