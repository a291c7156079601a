"""The store room: the state a key keeps and every claim of work, on SQLite or PostgreSQL, with its schema
(migrations), owner ids (keys) and per-key quotas. :class:`Store` is the entry every other room opens; the jobs,
batches and evals rooms keep their own tables' code beside their routes, over it (their ``store`` modules)."""

from tunesmith.serve.store.claims import LEASE_S, Claim, ClaimLost
from tunesmith.serve.store.objects import Store, new_id, worker_id

__all__ = ["LEASE_S", "Claim", "ClaimLost", "Store", "new_id", "worker_id"]
