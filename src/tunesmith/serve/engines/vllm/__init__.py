"""vLLM behind tunesmith: the server started on a private socket and supervised (``server``), the shim run
inside vLLM's own Python (``shim``: the key on every route, no network), adapters loaded off the event loop
(``adapters``) and the engine the routes call (``engine``). May import the rest of ``serve.engines``."""
