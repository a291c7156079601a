"""A PostgreSQL server of the tests' own: initdb in a temporary folder, listening on a Unix socket only (no TCP),
stopped and removed after. As root (CI, containers) the server runs as the ``postgres`` system user, as PostgreSQL
requires. :func:`postgres_control` yields the server itself, which a fault test can stop, start again on the same
data folder and socket, and whose connections it can terminate."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def postgres_bin(name: str) -> str | None:
    """PostgreSQL's ``name`` program: on PATH, or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((str(v / name) for v in versions if (v / name).exists()), None)


def missing() -> str | None:
    """Why no test PostgreSQL can start here (None: it can)."""
    if postgres_bin("initdb") is None or postgres_bin("pg_ctl") is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def _as_server_user() -> dict:
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class PostgresServer:
    """A started PostgreSQL of the tests' own (:func:`postgres_control`): its databases' URLs, and the faults a test
    injects (stopped, started again on the same data folder and socket, every connection terminated)."""

    def __init__(self, folder: Path):
        self.folder, self.data, self.sockets = folder, folder / "data", folder / "sockets"
        self.urls: dict[str, str] = {}
        self.options = (f"-k {self.sockets} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                        "-c max_connections=200")
        self.who = _as_server_user()

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120, **self.who)

    def init(self) -> None:
        self.sockets.mkdir()
        if self.who:
            for path in (self.folder, self.sockets):
                os.chown(path, self.who["user"], self.who["group"])
        self._run([postgres_bin("initdb"), "-D", str(self.data), "-U", "tunesmith", "-A", "trust", "--no-sync",
                   "-E", "UTF8", "--locale", "C"])

    def start(self) -> None:
        """Started (again), on the same data folder and socket; returns once it accepts connections."""
        self._run([postgres_bin("pg_ctl"), "-D", str(self.data), "-o", self.options, "-l", str(self.folder / "log"),
                   "-w", "start"])

    def stop(self, mode: str = "fast", check: bool = True) -> None:
        """Stopped (``fast``: its connections cut, as a database restarted by its operator); returns once down."""
        self._run([postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], check)

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create(self, name: str) -> str:
        self._run([postgres_bin("createdb") or "createdb", "-h", str(self.sockets), "-U", "tunesmith", name])
        self.urls[name] = f"postgresql://tunesmith@/{name}?host={self.sockets}"
        return self.urls[name]

    def terminate(self, database: str) -> int:
        """Every connection to ``database`` terminated (``pg_terminate_backend``); returns how many."""
        sql = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
               f"'{database}' AND pid <> pg_backend_pid()")
        out = self._run([postgres_bin("psql") or "psql", "-h", str(self.sockets), "-U", "tunesmith", "-d", "postgres",
                         "-At", "-c", sql])
        return int(out.stdout.strip() or 0)

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def postgres_control(databases: tuple[str, ...] = ("tunesmith",)):
    """A started PostgreSQL (:class:`PostgresServer`) with each of ``databases`` created empty; stopped and removed
    after."""
    why = missing()
    if why:
        raise RuntimeError(why)
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="tunesmith-pg-")))
    try:
        server.init()
        server.start()
        for name in databases:
            server.create(name)
        yield server
    finally:
        if server.running:
            server.stop("immediate", check=False)
        shutil.rmtree(server.folder, ignore_errors=True)


@contextmanager
def postgres_server(databases: tuple[str, ...] = ("tunesmith",)):
    """A started PostgreSQL; yields {name: its postgresql:// URL} for each of ``databases`` (created empty)."""
    with postgres_control(databases) as server:
        yield server.urls
