"""API keys at rest: the store never keeps a key, only its owner id, a keyed hash of it.

``owner_id(secret, key)`` is ``"key_" + HMAC-SHA256(secret, key)``, where ``secret`` is 32 random bytes kept beside
the database in ``<data_dir>/server.secret`` (mode 0600). Every process of one data folder (the server, its jobs
worker, Ray workers, replicas sharing the folder) reads the same secret, so they agree on every key's owner id.
Imports nothing of the server: the store's migration and the routes both call it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from tunesmith.errors import ConfigError

SECRET_FILE = "server.secret"
SECRET_BYTES = 32
OWNER_ID = re.compile(r"key_[0-9a-f]{64}")  # what owner_id returns: a stored owner that already is one


def server_secret(data_dir: Path) -> bytes:
    """The data folder's secret, created on first use: written whole to a file of its own (O_EXCL, mode 0600), then
    hard-linked to ``server.secret``, which fails when the name exists. Processes starting at once on one folder
    therefore all end with the one secret that was linked first, never a half-written one."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(8)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(draft, path)
        except FileExistsError:  # another process linked its secret first: that one is the folder's
            pass
        finally:
            draft.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{path} holds {len(secret)} bytes, not {SECRET_BYTES}: it is not a secret tunesmith "
                          "wrote. Restore it from the backup taken with the database (every stored owner is keyed "
                          "by it); only for a new, empty data folder remove it and a new one is made")
    return secret


FINGERPRINT = "secret_fingerprint"  # the deployment table's row: which server.secret the database's owners are keyed by


def fingerprint(secret: bytes) -> str:
    """What the database keeps of the secret: a hash that names it, never tells it."""
    return hashlib.sha256(b"tunesmith server.secret fingerprint\x00" + secret).hexdigest()[:32]


def checked_secret(db, data_dir: Path, database: str = "the database") -> bytes:
    """The data folder's secret, checked against the fingerprint ``db`` keeps (recorded at the first start): a replica
    whose folder has no ``server.secret`` while the database has one recorded, or another one, refuses to start
    rather than compute other owner ids (every object of every key would 404 there, its uploads land apart, its limits
    count apart). A folder without a secret and a database without a fingerprint (the first start) makes one."""
    path = Path(data_dir) / SECRET_FILE
    row = db.execute("SELECT value FROM deployment WHERE name = ?", (FINGERPRINT,)).fetchone()
    if row is not None and not path.exists():
        raise ConfigError(f"--data-dir {Path(data_dir).resolve()} has no {SECRET_FILE}, but {database} was first used "
                          f"with a data folder that has one (fingerprint {row[0]}): is the shared folder mounted? Start "
                          f"the replica with the folder every replica shares (or restore {SECRET_FILE} from the backup "
                          "taken with the database); a new secret would key every owner apart")
    secret = server_secret(data_dir)
    mine = fingerprint(secret)
    if row is None:
        db.execute("INSERT OR IGNORE INTO deployment VALUES (?, ?)", (FINGERPRINT, mine))
        row = db.execute("SELECT value FROM deployment WHERE name = ?", (FINGERPRINT,)).fetchone()
    if row[0] != mine:
        raise ConfigError(f"--data-dir {Path(data_dir).resolve()}: its {SECRET_FILE} (fingerprint {mine}) is not the "
                          f"one {database} was first used with (fingerprint {row[0]}): every replica must share one "
                          "data folder (the same secret); mount that folder here")
    return secret


def owner_id(secret: bytes, key: str | None) -> str | None:
    """The owner id stored for ``key`` (None for None): ``key_`` and the hex HMAC-SHA256 of the key under the
    server's secret. A keyed hash, not a plain one: with a plain hash, a copy of the database alone would confirm
    any guessed key (hash the guess, look it up); without the secret file, an owner id tells nothing about a key."""
    if key is None:
        return None
    return "key_" + hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def is_owner_id(value: str | None) -> bool:
    """Whether a stored owner already is an owner id (not a raw key kept by an older version)."""
    return value is not None and OWNER_ID.fullmatch(value) is not None
