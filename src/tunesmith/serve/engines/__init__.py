"""Inference engines behind one interface (``builtin.InferenceEngine``): the builtin continuous-batching
engine (``builtin``) and vLLM started, supervised and restarted behind tunesmith (``vllm/``); trained heads
that answer a label (``heads``); the errors every room of the server answers with (``errors.APIError``);
worker-process helpers (``process``) and one GPU shared by vLLM and the jobs worker (``gpu_split``).

Engines take a request plan and read it; they import nothing from ``plan``, ``api``, ``jobs``, ``evals``
or ``app``, only the layers below serve (generation, models, machine).
"""
