"""A real PostgreSQL server for the tests: a throwaway cluster in a temporary folder, on a free port.

Our own small class rather than pytest-postgresql: that plugin runs ``pg_ctl`` as the current user, and
CI runs as root, which PostgreSQL refuses; here every PostgreSQL command runs as an unprivileged user
when the tests run as root (the ``postgres`` system user that Debian's package makes).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SETUP_HINT = "run scripts/setup.sh (it installs Debian's postgresql package)"


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: pg_config's answer, else the newest Debian version installed."""
    candidates = []
    if shutil.which("pg_config"):
        # pg_config alone can come from libpq-dev without the server, so initdb must be there too.
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise RuntimeError(f"PostgreSQL server not installed (no initdb via pg_config --bindir or in /usr/lib/postgresql/*/bin): {SETUP_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster: ``initdb`` into a fresh temporary folder, served on 127.0.0.1:``port``
    (its unix socket in that folder too), trust authentication for local connections, one database.

    ``start()`` / ``stop()`` / ``restart()`` may be called any number of times (the data stays: tests
    stop the server under load and start it again); ``cleanup()`` stops it and deletes the folder.
    """

    def __init__(self, database: str = "patchcore_test", user: str = "postgres", start_timeout: float = 60.0):
        self.bindir = find_bindir()
        self.database = database
        self.user = user  # the database superuser that initdb makes
        self.start_timeout = start_timeout
        self._run_as = self._unprivileged_prefix()
        base = tempfile.gettempdir()
        if self._run_as and not os.stat(base).st_mode & 0o001:
            base = "/tmp"  # the unprivileged user must be able to pass through the folder above ours
        self.root = Path(tempfile.mkdtemp(prefix="patchcore-pg-", dir=base))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self._run_as:
            owner = pwd.getpwnam(self._owner)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        self._initialised = False
        self._database_made = False

    # -- running PostgreSQL's commands -------------------------------------------------------------

    def _unprivileged_prefix(self) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run its commands as the ``postgres`` system user."""
        if os.geteuid() != 0:
            self._owner = None
            return []
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            self._owner = name
            if shutil.which("runuser"):
                return ["runuser", "-u", name, "--"]
            if shutil.which("setpriv"):
                return ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups", "--"]
            raise RuntimeError("running as root, and neither runuser nor setpriv is there to run PostgreSQL as an unprivileged user")
        raise RuntimeError(f"running as root, and no 'postgres' user to run PostgreSQL as: {SETUP_HINT}")

    def _env(self) -> dict[str, str]:
        # The caller's PG* settings (PGHOST, PGPORT, PGDATA...) must not point our commands elsewhere.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run(self, tool: str, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        command = [*self._run_as, str(self.bindir / tool), *args]
        # cwd: the unprivileged user may not be able to enter the caller's directory (/root).
        done = subprocess.run(command, cwd=self.root, env=self._env(), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{tool} failed (exit {done.returncode}): {detail[-1] if detail else 'no output'}; log: {self.log}")
        return done

    def _initdb(self) -> None:
        # --no-sync: a throwaway cluster needs no fsync of its initial files (saves seconds).
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            # a test cluster: commits are still durable against a server crash (the OS keeps the
            # writes), only not against a power cut, which no test makes
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",  # several servers' pools at once
            "shared_buffers": "32MB",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# patchcore tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._initialised = True

    # -- the API the tests use ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database (psycopg 3 driver)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def is_running(self) -> bool:
        if not self._initialised:
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self) -> "PostgresServer":
        """Start the server (making the cluster and database the first time); returns when it accepts connections."""
        if not self._initialised:
            self._initdb()
        if self.is_running:
            return self
        for attempt in range(3):
            done = self._run("pg_ctl", "start", "-w", "-t", str(int(self.start_timeout)), "-D", str(self.data),
                             "-l", str(self.log), "-o", f"-p {self.port}", timeout=self.start_timeout + 30, check=False)
            if done.returncode == 0:
                break
            # The free port was taken between choosing and binding it: choose again (first start only,
            # since a restart must keep the URL the tests already hold).
            if not self._database_made and attempt < 2 and "already in use" in self._log_tail():
                self.port = free_port()
                continue
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {self._log_tail() or done.stderr.strip()}; log: {self.log}")
        if not self._database_made:
            self.create_database(self.database)
            self._database_made = True
        return self

    def create_database(self, name: str) -> str:
        """Make another database in this cluster (for a test that wants a clean one); returns its URL."""
        self._run("createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.user, name)
        return self.url_for(name)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and wait until it is gone; ``fast`` disconnects clients and shuts down cleanly."""
        if self.is_running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60", timeout=90)

    def restart(self) -> "PostgresServer":
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete its folder."""
        if self._initialised and self.data.exists():
            try:
                self.stop(mode="immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if "FATAL" in line or "ERROR" in line]
        return (errors or lines or [""])[-1]

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"PostgresServer({self.url}, data={self.data})"
