"""A real Ray cluster of several nodes on this machine, for the ``--ray`` tests: ``ray start --head``
and ``ray start --address=...`` workers, each node with its own CPU budget and a small object store.

Authentication stays on, as ``ray start --head`` sets it up for users: every process (the nodes,
and each driver run with :attr:`LocalRayCluster.env`) runs with ``RAY_AUTH_MODE=token`` and the
cluster's token in ``RAY_AUTH_TOKEN``, a fresh one per cluster, so nothing is read from or written
to ``~/.ray``.

Each node runs ``ray start --block`` as the leader of a new session; stopping kills exactly the
processes of those sessions (Ray's workers stay in their node's session), so no other Ray on the
machine is touched, unlike ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving import free_port

#: the ``ray`` command of the Python running the tests
RAY = str(Path(sys.executable).with_name("ray"))

#: a driver that waits until the cluster has N alive nodes, then prints {node id: is head} (Ray's own API)
WAIT_FOR_NODES = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], logging_level="warning", log_to_driver=False)
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]):
    time.sleep(0.5)
print(json.dumps({n["NodeID"]: "node:__internal_head__" in n["Resources"] for n in alive}))
"""


class LocalRayCluster:
    """``nodes`` Ray nodes on this machine, ``cpus_per_node`` logical CPUs each; use as a context manager."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, object_store_bytes: int = 100 * 2**20, start_timeout_s: float = 120) -> None:
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        #: the environment every process of this cluster runs with: token authentication on
        self.env = auth_env()
        # Short, because Ray's Unix sockets live below it and their paths may not exceed 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pcray-"))
        self.processes: list[subprocess.Popen] = []
        #: the Ray node ids, once started: the head's, then the workers'
        self.node_ids: list[str] = []

    def __enter__(self) -> "LocalRayCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Starts the head, then the workers, and returns once every node has joined."""
        common = [
            f"--num-cpus={self.cpus_per_node}", f"--object-store-memory={self.object_store_bytes}", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", "--block",
        ]
        deadline = time.monotonic() + self.start_timeout_s
        self._start_node("head", ["--head", f"--port={self.port}", "--include-dashboard=false", *common])
        while not _answers(self.port):
            if self.processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {self.logs()}")
            time.sleep(0.5)
        for number in range(1, self.nodes):
            self._start_node(f"worker{number}", [f"--address={self.address}", *common])
        try:
            waited = subprocess.run(
                [sys.executable, "-c", WAIT_FOR_NODES, self.address, str(self.nodes)], env=self.env, capture_output=True, text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"fewer than {self.nodes} Ray nodes up after {self.start_timeout_s:.0f} s: {self.logs()}") from None
        if waited.returncode != 0:
            raise RuntimeError(f"could not join the Ray cluster at {self.address}: {waited.stderr[-1000:]} {self.logs()}")
        heads = json.loads(waited.stdout.splitlines()[-1])
        self.node_ids = sorted(heads, key=lambda node: not heads[node])

    def _start_node(self, name: str, options: list[str]) -> None:
        folder = self.root / name
        folder.mkdir()
        with open(folder / "ray_start.log", "w") as log:
            self.processes.append(subprocess.Popen(
                [RAY, "start", f"--temp-dir={folder}", *options], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def logs(self) -> str:
        return " | ".join(f"{path.parent.name}: {path.read_text()[-500:]}" for path in sorted(self.root.glob("*/ray_start.log")))

    def stop(self) -> None:
        """Kills every process of this cluster's nodes, workers first, and removes its folders."""
        for process in reversed(self.processes):
            _kill_session(process.pid)
            process.wait(timeout=30)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_session(session: int) -> None:
    """SIGKILL to every process in a session (as ``ray stop --force`` does to every Ray process)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:  # after ')': state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def auth_env() -> dict[str, str]:
    """This process's environment with token authentication on and a fresh token, for a driver
    that starts its own local Ray instance: nothing read from or written to ``~/.ray``."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    return env
