"""The store's schema: named migrations in order, each SQL (in the dialect both backends take,
:mod:`tunesmith.serve.store.database`) or a Python step called with the database and the data folder inside the same
transaction. A database is brought up to date when a :class:`tunesmith.serve.store.Store` opens it.

Replicas on one PostgreSQL are upgraded one at a time, so the release before keeps running on a release's schema.
The rule: a release's migrations only add (tables, indexes, columns that are nullable or have a default); a table or
column is dropped or renamed only in a release after the one whose code stopped using it. A Python step that rewrites
or copies rows sees only the rows there when it runs, not what a replica of the release before writes afterwards:
a release with one is upgraded with every replica stopped (docs/serve.md, upgrades one replica at a time). On
PostgreSQL a table's ``rowid`` comes before the columns added to it later, so an INSERT into such a table names its
columns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tunesmith.serve.store.keys import is_owner_id, owner_id, server_secret


def owners_as_ids(db, root: Path) -> None:
    """Every ``owner`` column of every table, rewritten from the raw API key an older version stored to its owner
    id; NULL (no keys) and values that already are owner ids are left alone."""
    secret = server_secret(root)
    for table in db.tables():
        if "owner" not in db.columns(table):
            continue
        raw = [r[0] for r in db.execute(f'SELECT DISTINCT owner FROM "{table}" WHERE owner IS NOT NULL')]
        for key in (k for k in raw if not is_owner_id(k)):
            db.execute(f'UPDATE "{table}" SET owner = ? WHERE owner = ?', (owner_id(secret, key), key))


def claim_generations(db, root: Path) -> None:
    """A ``generation`` on every claimable row (0: never claimed since), and the chunks' ``parts_generation``."""
    for table in ("jobs", "batches", "batch_chunks", "eval_runs"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN generation INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE batch_chunks ADD COLUMN parts_generation INTEGER NOT NULL DEFAULT 0")


def claim_statuses(db, root: Path) -> None:
    """A ``claim_status`` on batches and batch_finishes, taken from the ``claimed_by`` that said it until now (a batch
    run by its chunks, ``chunks``; a batch's finishing over, ``ended``), those rows' claims let go."""
    for table, status in (("batches", "chunks"), ("batch_finishes", "ended")):
        db.execute(f"ALTER TABLE {table} ADD COLUMN claim_status TEXT")
        db.execute(f"UPDATE {table} SET claim_status = claimed_by, claimed_by = NULL, lease_until = NULL "
                   "WHERE claimed_by = ?", (status,))


def tag_stored_completions(db, root: Path) -> None:
    """The metadata of every stored completion kept before the tags table, as its tags."""
    rows = db.execute("SELECT id, owner, created_at, rowid, metadata FROM stored_completions").fetchall()
    db.executemany("INSERT INTO stored_completion_tags VALUES (?, ?, ?, ?, ?, ?)", [
        (r[0], r[1], k, v, r[2], r[3]) for r in rows for k, v in _object(r[4]).items() if isinstance(v, str)])


def _object(text: str | None) -> dict:
    """A JSON object's text as a dict; anything else (nothing, not JSON, not an object) as no pairs."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


Migration = str | Callable[[object, Path], None]
MIGRATIONS: list[tuple[str, Migration]] = [
    ("0001_files", """
        CREATE TABLE files (
            id TEXT PRIMARY KEY, owner TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL,
            bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, storage TEXT NOT NULL
        )"""),
    ("0002_jobs", """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY, owner TEXT, model TEXT NOT NULL, training_file TEXT NOT NULL,
            validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, method TEXT NOT NULL,
            metadata TEXT, status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT,
            created_at INTEGER NOT NULL, finished_at INTEGER, trained_tokens INTEGER,
            result_files TEXT NOT NULL DEFAULT '[]', run_dir TEXT, control TEXT
        )"""),
    ("0003_events", """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
            data TEXT, dedup_key TEXT NOT NULL, UNIQUE (job_id, dedup_key)
        )"""),
    ("0004_checkpoints", """
        CREATE TABLE checkpoints (
            id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step_number INTEGER NOT NULL, created_at INTEGER NOT NULL,
            metrics TEXT NOT NULL, path TEXT NOT NULL, fine_tuned_model_checkpoint TEXT NOT NULL,
            UNIQUE (job_id, step_number)
        )"""),
    ("0005_job_queue_index", "CREATE INDEX jobs_status ON jobs (status, created_at)"),
    ("0006_evals", """
        CREATE TABLE evals (
            id TEXT PRIMARY KEY, owner TEXT, name TEXT NOT NULL, data_source_config TEXT NOT NULL,
            testing_criteria TEXT NOT NULL, metadata TEXT, created_at INTEGER NOT NULL
        )"""),
    ("0007_eval_runs", """
        CREATE TABLE eval_runs (
            id TEXT PRIMARY KEY, eval_id TEXT NOT NULL, owner TEXT, name TEXT NOT NULL, model TEXT NOT NULL,
            status TEXT NOT NULL, data_source TEXT NOT NULL, metadata TEXT, error TEXT, result_counts TEXT,
            per_testing_criteria_results TEXT, per_model_usage TEXT, created_at INTEGER NOT NULL
        )"""),
    ("0008_eval_output_items", """
        CREATE TABLE eval_output_items (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, eval_id TEXT NOT NULL, item_index INTEGER NOT NULL,
            status TEXT NOT NULL, datasource_item TEXT NOT NULL, results TEXT NOT NULL, sample TEXT NOT NULL,
            created_at INTEGER NOT NULL, UNIQUE (run_id, item_index)
        )"""),
    ("0009_job_integrations", "ALTER TABLE jobs ADD COLUMN integrations TEXT"),
    ("0010_job_estimated_finish", "ALTER TABLE jobs ADD COLUMN estimated_finish INTEGER"),
    ("0011_job_model_deleted", "ALTER TABLE jobs ADD COLUMN model_deleted INTEGER NOT NULL DEFAULT 0"),
    ("0012_eval_updated_at", "ALTER TABLE evals ADD COLUMN updated_at REAL"),  # NULL: never updated (created_at)
    ("0013_responses", """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY, owner TEXT, created_at INTEGER NOT NULL, messages TEXT NOT NULL, response TEXT NOT NULL
        )"""),
    ("0014_uploads", """
        CREATE TABLE uploads (
            id TEXT PRIMARY KEY, owner TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
            mime_type TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
            file_id TEXT
        )"""),
    ("0015_upload_parts", """
        CREATE TABLE upload_parts (
            id TEXT PRIMARY KEY, upload_id TEXT NOT NULL, created_at INTEGER NOT NULL, bytes INTEGER NOT NULL,
            storage TEXT NOT NULL
        )"""),
    ("0016_job_parent_model", "ALTER TABLE jobs ADD COLUMN parent_model TEXT"),  # the ft: model a job continues
    ("0017_stored_completions", """
        CREATE TABLE stored_completions (
            id TEXT PRIMARY KEY, owner TEXT, model TEXT NOT NULL, created_at INTEGER NOT NULL, metadata TEXT NOT NULL,
            request TEXT NOT NULL, completion TEXT NOT NULL
        )"""),
    ("0018_stored_completions_index", "CREATE INDEX stored_completions_by_owner ON stored_completions (owner, created_at)"),
    ("0019_batches", """
        CREATE TABLE batches (
            id TEXT PRIMARY KEY, owner TEXT, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL, status TEXT NOT NULL, metadata TEXT, errors TEXT, model TEXT,
            output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
            in_progress_at INTEGER, expires_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
            expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER
        )"""),
    ("0020_batch_results", """
        CREATE TABLE batch_results (
            batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, status_code INTEGER NOT NULL,
            body TEXT NOT NULL, PRIMARY KEY (batch_id, line)
        )"""),
    ("0021_owners_as_keyed_hashes", owners_as_ids),
    # per-key quotas count with these (tunesmith.serve.store.quotas); a file may expire (NULL: kept until deleted)
    ("0022_files_by_owner", "CREATE INDEX files_by_owner ON files (owner, bytes)"),
    ("0023_file_expires_at", "ALTER TABLE files ADD COLUMN expires_at INTEGER"),
    ("0024_uploads_by_owner", "CREATE INDEX uploads_by_owner ON uploads (owner, status)"),
    ("0025_responses_by_owner", "CREATE INDEX responses_by_owner ON responses (owner)"),
    ("0026_stored_completions_by_model",
     "CREATE INDEX stored_completions_by_model ON stored_completions (owner, model, created_at)"),
    ("0027_batches_by_owner", "CREATE INDEX batches_by_owner ON batches (owner, status)"),
    ("0028_evals_by_owner", "CREATE INDEX evals_by_owner ON evals (owner)"),
    ("0029_eval_runs_by_owner", "CREATE INDEX eval_runs_by_owner ON eval_runs (owner)"),
    ("0030_upload_file_expires", "ALTER TABLE uploads ADD COLUMN file_expires_s INTEGER"),  # its file's expires_after
    # a batch's answers are appended to its output and error files; the lengths recorded with each answered line
    ("0031_batch_output_bytes", "ALTER TABLE batches ADD COLUMN output_bytes INTEGER NOT NULL DEFAULT 0"),
    ("0032_batch_error_bytes", "ALTER TABLE batches ADD COLUMN error_bytes INTEGER NOT NULL DEFAULT 0"),
    ("0033_batch_output_expires", "ALTER TABLE batches ADD COLUMN output_expires_s INTEGER"),  # output_expires_after
    # work claimed, not owned: the worker or replica running a job, a batch or an eval run, until its lease ends
    ("0034_job_claims", "ALTER TABLE jobs ADD COLUMN claimed_by TEXT"),
    ("0035_job_leases", "ALTER TABLE jobs ADD COLUMN lease_until REAL"),
    ("0036_batch_claims", "ALTER TABLE batches ADD COLUMN claimed_by TEXT"),
    ("0037_batch_leases", "ALTER TABLE batches ADD COLUMN lease_until REAL"),
    ("0038_eval_run_claims", "ALTER TABLE eval_runs ADD COLUMN claimed_by TEXT"),
    ("0039_eval_run_leases", "ALTER TABLE eval_runs ADD COLUMN lease_until REAL"),
    # a key's requests in flight on each replica (tunesmith.serve.api.shared_limits; PostgreSQL only)
    ("0040_key_places", """
        CREATE TABLE key_places (
            owner TEXT NOT NULL, replica TEXT NOT NULL, in_flight INTEGER NOT NULL, seen REAL NOT NULL,
            PRIMARY KEY (owner, replica)
        )"""),
    # a stored completion's metadata, one row a pair, in its list order (created_at, then the completion's rowid)
    ("0041_stored_completion_tags", """
        CREATE TABLE stored_completion_tags (
            completion_id TEXT NOT NULL, owner TEXT, name TEXT NOT NULL, value TEXT NOT NULL,
            created_at INTEGER NOT NULL, seq INTEGER NOT NULL
        )"""),
    ("0042_stored_completion_tags_by_value",
     "CREATE INDEX stored_completion_tags_by_value ON stored_completion_tags (owner, name, value, created_at, seq)"),
    ("0043_stored_completion_tags_by_completion",
     "CREATE INDEX stored_completion_tags_by_completion ON stored_completion_tags (completion_id, name, value)"),
    ("0044_stored_completion_tags_kept", tag_stored_completions),
    # a model resolved by name on any replica (tunesmith.serve.api.served_models), a key's jobs listed
    ("0045_jobs_by_model", "CREATE INDEX jobs_by_model ON jobs (fine_tuned_model)"),
    ("0046_jobs_by_owner", "CREATE INDEX jobs_by_owner ON jobs (owner, status, created_at)"),
    ("0047_checkpoints_by_model", "CREATE INDEX checkpoints_by_model ON checkpoints (fine_tuned_model_checkpoint)"),
    # the tokens a key's requests asked for, per whole second, summed over the sliding minute by every replica
    # (tunesmith.serve.api.shared_limits; PostgreSQL only)
    ("0048_key_tokens", """
        CREATE TABLE key_tokens (
            owner TEXT NOT NULL, bucket INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (owner, bucket)
        )"""),
    # a batch's lines in chunks (first_line and the lines it spans of the input file, from first_byte; requests: its
    # non-blank lines), each claimed by one replica at a time, its answers in part files of its own with their lengths
    # (tunesmith.serve.batches.store); answered_by: the replica that answered its last line
    ("0049_batch_chunks", """
        CREATE TABLE batch_chunks (
            id TEXT PRIMARY KEY, batch_id TEXT NOT NULL, chunk INTEGER NOT NULL, first_line INTEGER NOT NULL,
            lines INTEGER NOT NULL, first_byte INTEGER NOT NULL, requests INTEGER NOT NULL, status TEXT NOT NULL,
            claimed_by TEXT, lease_until REAL, output_bytes INTEGER NOT NULL DEFAULT 0,
            error_bytes INTEGER NOT NULL DEFAULT 0, answered_by TEXT
        )"""),
    ("0050_batch_chunks_by_batch", "CREATE UNIQUE INDEX batch_chunks_by_batch ON batch_chunks (batch_id, chunk)"),
    # every claim fenced by a generation (tunesmith.serve.store.claims); a chunk's recorded answers are in the part
    # files of the generation that recorded them (parts_generation); a batch's finishing is a claim of its own row
    ("0051_claim_generations", claim_generations),
    ("0052_batch_finishes", """
        CREATE TABLE batch_finishes (
            id TEXT PRIMARY KEY, claimed_by TEXT, lease_until REAL, generation INTEGER NOT NULL DEFAULT 0
        )"""),
    # what the database knows of the deployment: the fingerprint of the data folder's server.secret
    # (tunesmith.serve.store.keys), and the replicas that wrote to it lately (each one's /ready writes its row)
    ("0053_deployment", "CREATE TABLE deployment (name TEXT PRIMARY KEY, value TEXT NOT NULL)"),
    ("0054_replicas", "CREATE TABLE replicas (id TEXT PRIMARY KEY, seen REAL NOT NULL)"),
    # the Tinker API's training runs (tunesmith.serve.tinker): each a LoRA of the served base, claimed by the replica
    # that holds it in memory; and their checkpoints (tinker:// paths), sampler ones served as models of their key
    ("0055_tinker_runs", """
        CREATE TABLE tinker_runs (
            id TEXT PRIMARY KEY, owner TEXT, base_model TEXT NOT NULL, lora TEXT NOT NULL, metadata TEXT,
            created_at INTEGER NOT NULL, last_request_at INTEGER NOT NULL, claimed_by TEXT, lease_until REAL,
            generation INTEGER NOT NULL DEFAULT 0
        )"""),
    ("0056_tinker_checkpoints", """
        CREATE TABLE tinker_checkpoints (
            path TEXT PRIMARY KEY, run_id TEXT NOT NULL, owner TEXT, kind TEXT NOT NULL, name TEXT NOT NULL,
            folder TEXT NOT NULL, size_bytes INTEGER NOT NULL, metadata TEXT, created_at INTEGER NOT NULL,
            expires_at INTEGER
        )"""),
    ("0057_tinker_runs_by_owner", "CREATE INDEX tinker_runs_by_owner ON tinker_runs (owner, created_at)"),
    ("0058_tinker_checkpoints_by_run", "CREATE INDEX tinker_checkpoints_by_run ON tinker_checkpoints (run_id)"),
    # sampling sessions (any replica samples from any of them) and the samples recorded for stable_reinforce: a
    # request's prompt and its sequences' tokens and logprobs, kept a day after their last use
    ("0059_tinker_sampling_sessions", """
        CREATE TABLE tinker_sampling_sessions (
            id TEXT PRIMARY KEY, owner TEXT, session_id TEXT NOT NULL, model_path TEXT, created_at REAL NOT NULL
        )"""),
    ("0060_tinker_sampling_sessions_by_owner",
     "CREATE INDEX tinker_sampling_sessions_by_owner ON tinker_sampling_sessions (owner, created_at)"),
    ("0061_tinker_samples", """
        CREATE TABLE tinker_samples (
            id TEXT PRIMARY KEY, owner TEXT, session_id TEXT NOT NULL, prompt TEXT NOT NULL, sequences TEXT NOT NULL,
            used_at REAL NOT NULL
        )"""),
    ("0062_tinker_samples_by_owner", "CREATE INDEX tinker_samples_by_owner ON tinker_samples (owner, used_at)"),
    # futures, so that any replica answers retrieve_future: each call's row (its answer a file on the shared data
    # folder once it ended), and each replica's Tinker presence, a claim its heartbeat renews (a future whose holder's
    # claim ran out or changed generation will not be answered)
    ("0063_tinker_futures", """
        CREATE TABLE tinker_futures (
            id TEXT PRIMARY KEY, owner TEXT, kind TEXT NOT NULL, holder TEXT NOT NULL, holder_generation INTEGER NOT NULL,
            created_at REAL NOT NULL, ended_at REAL, error TEXT, category TEXT, answer_kind TEXT, answer_file TEXT
        )"""),
    ("0064_tinker_futures_ended", "CREATE INDEX tinker_futures_ended ON tinker_futures (ended_at)"),
    ("0065_tinker_replicas", """
        CREATE TABLE tinker_replicas (
            id TEXT PRIMARY KEY, claimed_by TEXT, lease_until REAL, generation INTEGER NOT NULL DEFAULT 0
        )"""),
    # the Tinker API's client sessions: made by the server, each of the key that made it (runs and sampling sessions
    # are made only in a session of their own key; a finished one takes none)
    ("0066_tinker_sessions", """
        CREATE TABLE tinker_sessions (
            id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL, finished_at REAL
        )"""),
    ("0067_tinker_sessions_by_owner", "CREATE INDEX tinker_sessions_by_owner ON tinker_sessions (owner, created_at)"),
    # what a claimed row's work has become is a status of its own, no longer a holder in claimed_by with an endless
    # lease (tunesmith.serve.store.claims): a batch run by its chunks, a batch's finishing over
    ("0068_claim_statuses", claim_statuses),
    # the Tinker API's per-run command log: a training call taken by any replica, applied in the SDK's seq_id order by
    # the replica that holds the run (its future's id in rid; a forward_backward's body a file on the shared folder)
    ("0069_tinker_commands", """
        CREATE TABLE tinker_commands (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, rid TEXT NOT NULL, owner TEXT, kind TEXT NOT NULL,
            args TEXT NOT NULL, body_bytes INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (run_id, seq)
        )"""),
    ("0070_tinker_commands_by_rid", "CREATE INDEX tinker_commands_by_rid ON tinker_commands (rid)"),
]
