"""A generation request's plan: which fields are honoured (``fields``), the request bodies (``schemas``),
tools (``tools``) and the one plan per request kind (``requests``: chat completions, completions, Responses).

A plan is built in one pass from the body and says everything the engines and the answer need; the engines
and the routes read it and never rebuild part of it. May import ``serve.engines`` (the engine's tokenizer and
context, its errors) and the layers below serve; never the routes above it.
"""
