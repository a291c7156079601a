"""OpenAI's Evals and graders APIs: the routes (``routes``, ``routes_graders``), an eval's checks
(``check``), its runs (``run``) and their storage (``store``), and graders as the server runs them
(``grading``: model graders answered by the served models).

May import ``serve.api`` (the API key, visible models, object shapes), ``serve.engines``, ``serve.store``
and the layers below serve (graders).
"""
