"""Synthetic data: LLM clients, a per-call SQLite cache, structured replies and generation tasks."""
