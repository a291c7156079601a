"""The OpenAI inference front end: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses`` and ``/v1/embeddings``, the API key every route of the server checks (``auth.Key``)
and OpenAI's object shapes (``objects``).

A route checks the caller, asks :mod:`tunesmith.serve.plan` for the request's plan, hands it to an engine
and writes the engine's generations in OpenAI's shape. May import ``serve.plan``, ``serve.engines``,
``serve.store`` and the layers below serve; never ``jobs``, ``evals``, ``dashboard`` or ``app``.
"""
