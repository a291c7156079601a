"""The store room: every table of state a key keeps and every claim of work, on SQLite or PostgreSQL, with its schema
(migrations), owner ids (keys) and per-key quotas. :class:`Store` is the entry every other room opens."""

from tunesmith.serve.store.claims import LEASE_S, Claim, ClaimLost
from tunesmith.serve.store.objects import Store, new_id, worker_id

__all__ = ["LEASE_S", "Claim", "ClaimLost", "Store", "new_id", "worker_id"]
