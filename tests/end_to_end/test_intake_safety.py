"""An uploaded EPS or PDF never reaches Ghostscript, and every face gives the same error for a bad file.

Pillow's EPS plugin renders with Ghostscript (``gs``, found on PATH); the intake opens uploads with
an allow-list of raster decoders only, so an EPS is refused (415) before any plugin but those has
seen it. Proven here with Ghostscript installed and instrumented, not mocked: a ``gs`` first on
the server's PATH writes a line to a log and runs the real one. The server's log of ``gs`` stays
empty and no ``gs`` process is ever its child, while the same wrapper, given the same EPS through
plain Pillow, is run (the control: the test would see the allow-list ignored).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

ACCEPTED = "PNG, JPEG, BMP, TIFF, WebP, PNM"
GOOD = "mvtec_ad/bottle/test/good/000.png"


# ---------------------------------------------------------------------------------------------
# Ghostscript, instrumented


@dataclass
class LoggingGhostscript:
    """A ``gs`` that logs each call to ``log`` and then runs the real one; ``path`` puts it first."""

    real: str
    log: Path
    path: str

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def logging_gs(tmp_path) -> LoggingGhostscript:
    real = shutil.which("gs")
    if real is None:
        pytest.fail("Ghostscript (gs) is not installed, so these tests cannot prove that no upload reaches it: "
                    "install it (apt-get install ghostscript; scripts/setup.sh does)")
    real = os.path.realpath(real)
    folder = tmp_path / "gs-bin"
    folder.mkdir()
    log = tmp_path / "gs-calls.log"
    log.write_text("")
    wrapper = folder / "gs"
    wrapper.write_text(f'#!/bin/sh\necho "gs called (pid $$, parent $PPID): $*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return LoggingGhostscript(real=real, log=log, path=f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


class ChildWatcher:
    """Polls a process's descendants every ``interval`` s in a thread and keeps every one it saw."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.seen: dict[int, str] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.process.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    self.seen.setdefault(child.pid, f"{child.name()} {' '.join(child.cmdline())}")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    self.seen.setdefault(child.pid, "(gone before it could be named)")
            self.polls += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "ChildWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def ghostscripts(self) -> list[str]:
        return [what for what in self.seen.values() if what.split(" ", 1)[0] in ("gs", "gsc") or "/gs " in f"{what} " or "ghostscript" in what.lower()]


# ---------------------------------------------------------------------------------------------
# Hostile files


def pillow_bytes(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR says ``width`` x ``height`` (CRC fixed): only the size is hostile."""
    data = bytearray(pillow_bytes("PNG", (64, 64)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def refused(name: str, kind: str) -> str:
    return f"'{name}': not an accepted image format ({kind}; accepted: {ACCEPTED})"


def predict_url(server) -> str:
    return f"{server.url}/v2/models/bottle/predict"


def post(server, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(predict_url(server), files=[("file", (name, data, "application/octet-stream")) for name, data in files], timeout=120)


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_instrumented_gs_is_run_when_plain_pillow_opens_the_eps(logging_gs, tmp_path):
    """The control: Pillow without the allow-list runs Ghostscript for this EPS, through the
    wrapper, so the log would show it if the server's intake ignored its format list."""
    eps = tmp_path / "part.eps"
    eps.write_bytes(pillow_bytes("EPS"))
    code = "import sys; from PIL import Image; image = Image.open(sys.argv[1]); image.load(); print(image.format, image.size)"
    done = subprocess.run([sys.executable, "-c", code, str(eps)], env={**os.environ, "PATH": logging_gs.path}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "EPS"
    calls = logging_gs.calls()
    assert calls, "the gs wrapper was not run: the instrumentation would miss a Ghostscript call"
    assert any(str(eps) in call or "-sOutputFile" in call for call in calls), calls  # the rendering itself, not only gs --version


def test_an_uploaded_eps_or_pdf_is_refused_with_415_and_never_starts_ghostscript(logging_gs, bottle_model_file, start_server, data_root, monkeypatch):
    monkeypatch.setenv("PATH", logging_gs.path)  # RunningServer passes this process's environment on
    server = start_server(bottle_model_file)
    eps, pdf = pillow_bytes("EPS"), pillow_bytes("PDF")
    assert eps.startswith(b"%!PS-Adobe") and pdf.startswith(b"%PDF")
    # other formats off the list, with plugins of their own in Pillow
    others = {"part.gif": (pillow_bytes("GIF"), "GIF"), "part.ico": (pillow_bytes("ICO"), "ICO"), "part.psd": (b"8BPS\x00\x01" + b"\x00" * 40, "Photoshop"),
              "part.tga": (pillow_bytes("TGA"), "not an image"), "part.pcx": (pillow_bytes("PCX"), "not an image")}
    good = (data_root / GOOD).read_bytes()

    with ChildWatcher(server.process.pid) as watcher:
        replies = {
            "eps alone": post(server, [("part.eps", eps)]),
            "pdf alone": post(server, [("part.pdf", pdf)]),
            "eps as the body": httpx.post(predict_url(server), content=eps, params={"filename": "part.eps"}, timeout=120),
            "with a good image": post(server, [("part.eps", eps), ("good.png", good), ("part.pdf", pdf)]),
            "others": post(server, [(name, data) for name, (data, _) in others.items()]),
        }
        time.sleep(0.5)  # a Ghostscript started late would still be seen

    # First what this test is for: no Ghostscript, by its log and by the server's children.
    assert watcher.polls >= 10, "the child watcher hardly ran"
    assert logging_gs.calls() == [], f"the server ran gs: {logging_gs.calls()}"
    assert watcher.ghostscripts() == [], f"the server started Ghostscript: {watcher.ghostscripts()}"
    for what in ("eps alone", "eps as the body"):
        reply = replies[what]
        assert reply.status_code == 415, (what, reply.text)
        assert reply.json()["results"] == [{"path": "part.eps", "error": refused("part.eps", "PostScript/EPS"), "status": 415}]
        assert reply.json()["error"] == refused("part.eps", "PostScript/EPS")
    reply = replies["pdf alone"]
    assert reply.status_code == 415, reply.text
    assert reply.json()["results"] == [{"path": "part.pdf", "error": refused("part.pdf", "PDF"), "status": 415}]

    reply = replies["with a good image"]
    assert reply.status_code == 200, reply.text
    eps_result, good_result, pdf_result = reply.json()["results"]
    assert eps_result == {"path": "part.eps", "error": refused("part.eps", "PostScript/EPS"), "status": 415}
    assert pdf_result == {"path": "part.pdf", "error": refused("part.pdf", "PDF"), "status": 415}
    assert good_result["path"] == "good.png" and isinstance(good_result["score"], float) and good_result["is_anomalous"] is False

    reply = replies["others"]
    assert reply.status_code == 415, reply.text
    assert reply.json()["results"] == [{"path": name, "error": refused(name, kind), "status": 415} for name, (_, kind) in others.items()]

    assert server.process.poll() is None, server.log.read_text()


def test_the_command_line_and_the_server_give_the_same_error_for_the_same_file(logging_gs, bottle_model_file, start_server, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", logging_gs.path)
    limit = "1000000"
    server = start_server(bottle_model_file, "--max-image-pixels", limit)
    good = (data_root / GOOD).read_bytes()
    folder = tmp_path / "inputs"
    folder.mkdir()
    files = {
        "notes.png": (b"serial 1234, line 7: this is a text file\n", 415),
        "part.eps": (pillow_bytes("EPS"), 415),
        "part.pdf": (pillow_bytes("PDF"), 415),
        "cut.png": (good[:20000], 422),
        "tiny.png": (pillow_bytes("PNG", (4, 4)), 422),
        "bomb.png": (png_claiming(2000, 2000), 413),  # 4 MP by its header, above the limit of 1 MP
    }
    paths = []
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    paths.append(data_root / GOOD)

    out = tmp_path / "out"
    command = [sys.executable, "-m", "patchcore.cli", "predict", str(bottle_model_file), *map(str, paths), "--out", str(out),
               "--no-pictures", "--quiet", "--device", "cpu", "--max-image-pixels", limit]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # with the same PATH: gs logged
    assert done.returncode == 0, done.stderr
    lines = {line["path"]: line for line in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert set(lines) == set(map(str, paths))

    reply = post(server, [(str(path), path.read_bytes()) for path in paths])
    assert reply.status_code == 200, reply.text
    answers = {answer["path"]: answer for answer in reply.json()["results"]}
    assert list(answers) == list(map(str, paths))

    for path in paths[:-1]:
        line, answer = lines[str(path)], answers[str(path)]
        assert set(line) == {"path", "error"}, line
        assert answer["error"] == line["error"], path.name
        assert answer["status"] == files[path.name][1], (path.name, answer)
        assert line["error"].startswith(f"'{path}': ") and "\n" not in line["error"]
    assert lines[str(folder / "part.eps")]["error"] == refused(str(folder / "part.eps"), "PostScript/EPS")
    assert lines[str(folder / "bomb.png")]["error"] == f"'{folder / 'bomb.png'}': image is 2000x2000 px, more than the limit of 1,000,000 pixels (--max-image-pixels)"
    assert lines[str(folder / "tiny.png")]["error"] == f"'{folder / 'tiny.png'}': image is 4x4 px, too small (at least 8x8)"
    assert "score" in lines[str(data_root / GOOD)] and "score" in answers[str(data_root / GOOD)]
    assert logging_gs.calls() == [], f"the command line or the server ran gs: {logging_gs.calls()}"
