"""Serving: an OpenAI-compatible API over a base model and LoRA adapters, with fine-tuning jobs and Evals.

Rooms, each a folder, and the one way imports run between them (``tests/test_import_graph.py`` checks it
against the Rooms block of docs/architecture.md), top to bottom:

- ``app.py`` (the FastAPI app: settings, error handlers, routers) and ``launch.py`` (``tunesmith serve``)
  wire the rooms; nothing imports them but the CLI.
- ``dashboard/``: the web page over runs and jobs.
- ``jobs/``: the fine-tuning jobs API, its worker process and executors.
- ``evals/``: the Evals and graders APIs.
- ``tinker/``: the Tinker API (the ``tinker`` SDK's wire): training runs as LoRA adapters on the engine's base,
  several keys' calls in one pass, samples as the engine's rows, a per-run command log for replicas.
- ``api/``: the OpenAI inference routes (models, chat completions, completions, Responses, embeddings), the
  API key every route checks, and OpenAI's object shapes.
- ``plan/``: a request's body → one plan (prompt ids, tools, constraint, budget, sampling, stream flags, how
  the answer is read), built in one pass.
- ``engines/``: the inference-engine interface, the builtin engine, vLLM behind tunesmith, trained heads,
  the errors every room answers with, worker-process helpers and the GPU split.
- ``store/``: the server's per-key state on SQLite or PostgreSQL (files, uploads, responses, the fine-tuned models
  jobs made) and every claim of work with its SQL (``store/claims.py``); a room's own tables are its ``store.py``
  (``jobs/``, ``batches/``, ``evals/``); imports nothing here.
- ``keys.py``: API keys at rest: the server's secret and each key's owner id (a keyed hash), the only form of a
  key the store keeps; imports nothing here.
"""
