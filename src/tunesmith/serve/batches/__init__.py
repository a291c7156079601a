"""OpenAI's Batch API: a file of requests (``purpose: "batch"``) answered offline on the server's engine.

``routes`` (``/v1/batches``: create, retrieve, list, cancel), ``lines`` (a batch file's lines checked at upload,
each bad line named; the output and error files in OpenAI's format), ``store`` (batches, their chunks of lines and
each answered line in the server's store: a batch survives a restart and goes on where it stopped), ``output`` (the
input split into chunks, each chunk's answers in part files, the batch's files assembled from them) and ``runner``
(a task in each server, each replica, that claims chunks and answers their lines through the server's own routes,
in process, at a bounded share of the engine).

May import ``serve.api`` (the API key, object shapes), ``serve.jobs`` (the file checks), ``serve.engines``,
``serve.store`` and the layers below serve.
"""
