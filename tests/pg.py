"""A PostgreSQL server of the tests' own: initdb in a temporary folder, listening on a Unix socket only (no TCP),
stopped and removed after. As root (CI, containers) the server runs as the ``postgres`` system user, as PostgreSQL
requires."""

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


@contextmanager
def postgres_server(databases: tuple[str, ...] = ("tunesmith",)):
    """A started PostgreSQL; yields {name: its postgresql:// URL} for each of ``databases`` (created empty)."""
    why = missing()
    if why:
        raise RuntimeError(why)
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    who = _as_server_user()
    if who:
        for path in (folder, sockets):
            os.chown(path, who["user"], who["group"])
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120, **who}
    try:
        subprocess.run([postgres_bin("initdb"), "-D", str(data), "-U", "tunesmith", "-A", "trust", "--no-sync",
                        "-E", "UTF8", "--locale", "C"], **run)
        options = f"-k {sockets} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=200"
        subprocess.run([postgres_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
                        "start"], **run)
        urls = {}
        for name in databases:
            subprocess.run([postgres_bin("createdb") or "createdb", "-h", str(sockets), "-U", "tunesmith", name], **run)
            urls[name] = f"postgresql://tunesmith@/{name}?host={sockets}"
        yield urls
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           **{**run, "check": False})
        shutil.rmtree(folder, ignore_errors=True)
