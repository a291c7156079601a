"""Fine-tuning jobs: the ``/v1/files`` and ``/v1/fine_tuning`` routes (``routes``), jobs, their events and
checkpoints in the server's store (``store``), the worker process that trains them (``worker``; ``ray_executor`` on
a Ray cluster), job events (``events``), "auto" hyperparameters (``autohyper``) and reinforcement jobs
(``reinforcement``).

May import ``serve.evals`` (graders for reinforcement), ``serve.api`` (the API key, object shapes),
``serve.engines``, ``serve.store`` and the layers below serve (data, train, eval).
"""
