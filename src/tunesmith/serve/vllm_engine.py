"""The vLLM engine: tunesmith's API in front, a supervised vLLM OpenAI server behind.

Prompts are rendered and tokenized here with the base model's tokenizer, exactly as for the built-in engine
(chat template, tools, forced-call prefix), and sent to vLLM's ``/v1/completions`` as token ids, so both
engines see the same prompt and greedy answers agree. Each choice is one vLLM request (``n`` choices with
seeds ``seed + i``, as the built-in engine draws them); ``stop``, ``temperature``, ``top_p``, penalties,
``logit_bias`` and logprobs pass through, streamed text arrives as vLLM streams it (with its tokens' logprobs). A
forced tool call, ``response_format`` and ``text.format`` decode under vLLM's structured outputs, with the
built-in engine's library and grammars (:func:`engine_args`).

Adapters are loaded into vLLM at run time (``/v1/load_lora_adapter``) under their model id and unloaded when
deleted; the routes check ownership before a model id is sent here. vLLM's errors become OpenAI errors with
vLLM's status and message; a vLLM that dies is restarted (:mod:`tunesmith.serve.vllm_server`) and requests
meanwhile get a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.serve.engine import Delta, Generation, GenParams, InferenceEngine, Request
from tunesmith.serve.errors import APIError

log = logging.getLogger("tunesmith.serve")
ADAPTER_TIMEOUT_S = 120.0


class VllmEngine(InferenceEngine):
    def __init__(self, base: str, adapters: dict[str, str | Path] | None, log_dir: Path, python: str | None = None,
                 request_timeout_s: float = 300.0, extra_args: tuple[str, ...] = (), start_timeout_s: float | None = None):
        from tunesmith.serve.vllm_server import START_TIMEOUT_S, VllmServer, vllm_python

        super().__init__(base)
        launch = vllm_launch(base, (*engine_args(), *extra_args))  # the user's --vllm-arg come last and win
        self.context_length = launch.max_model_len
        self.request_timeout_s = request_timeout_s
        self.server = VllmServer(vllm_python(python), launch, log_dir, on_restart=self._reload_adapters,
                                 start_timeout_s=start_timeout_s or START_TIMEOUT_S)
        self.server.start()
        self._clients: dict[int, object] = {}  # event loop id -> httpx.AsyncClient
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    # --- adapters -------------------------------------------------------------------------

    def _load_adapter(self, name: str, path: str) -> None:
        if self.server.ready.is_set():  # else: loaded with the others once the restarted vLLM answers
            self._post_adapter("load", {"lora_name": name, "lora_path": str(Path(path).resolve())})

    def _unload_adapter(self, name: str) -> None:
        if self.server.ready.is_set():
            self._post_adapter("unload", {"lora_name": name})

    def _reload_adapters(self) -> None:
        for name, path in self.adapters.items():
            self._post_adapter("load", {"lora_name": name, "lora_path": str(Path(path).resolve())})

    def _post_adapter(self, action: str, body: dict) -> None:
        import httpx2 as httpx

        try:
            r = httpx.post(f"{self.server.url}/v1/{action}_lora_adapter", json=body, headers=self.server.headers,
                           timeout=ADAPTER_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise ModelError(f"vLLM did not answer the {action} of adapter {body['lora_name']}: {exc}; its log: "
                             f"{self.server.log_path}") from None
        if r.status_code != 200 and "already" not in r.text:  # loading twice (a restart race) is no error
            raise ModelError(f"vLLM refused to {action} adapter {body['lora_name']}: {error_message(r.text)}")

    def json_constraint(self, spec: dict | str) -> dict:
        """vLLM's structured outputs for ``spec``, as the built-in engine reads it: vLLM decodes with llguidance
        too (:func:`engine_args`), so a schema keeps its ``x-guidance`` separators and a Lark grammar is one."""
        return {"grammar": spec} if isinstance(spec, str) else {"json": spec}

    # --- requests -------------------------------------------------------------------------

    def submit(self, model_id: str, prompt_ids: list[int], params: list[GenParams], stream: bool = False,
               constraint=None, logprobs: int | None = None) -> Request:
        if not self.server.ready.is_set():
            raise unavailable()
        request = Request(len(params), asyncio.get_running_loop())
        name = self.served_name(model_id)
        for i, p in enumerate(params):
            body = completion_body(name, prompt_ids, p, stream, constraint, logprobs)
            task = asyncio.ensure_future(self._generate(request, i, body))
            request.on_cancel.append(task.cancel)
        return request

    async def _generate(self, request: Request, index: int, body: dict) -> None:
        import httpx2 as httpx

        try:
            read = self._stream if body["stream"] else self._complete
            request.push(index, await read(request, index, body))
        except APIError as exc:
            request.push(index, exc)
        except httpx.TimeoutException:
            request.push(index, APIError(504, f"The generation took longer than the server's "
                                         f"{self.request_timeout_s:.0f} s limit.", type_="server_error",
                                         code="timeout"))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("vLLM request failed: %s: %s (its log: %s)", type(exc).__name__, exc, self.server.log_path)
            request.push(index, unavailable())

    async def _complete(self, request: Request, index: int, body: dict) -> Generation:
        r = await self._client().post(f"{self.server.url}/v1/completions", json=body, headers=self.server.headers)
        if r.status_code != 200:
            raise vllm_error(r.status_code, r.text)
        doc = r.json()
        return generation(doc["choices"][0], doc["usage"])

    async def _stream(self, request: Request, index: int, body: dict) -> Generation:
        """Push each text delta; the final Generation once vLLM says why it stopped and the usage."""
        choice, usage, text, tops = None, None, [], []
        async with self._client().stream("POST", f"{self.server.url}/v1/completions", json=body,
                                         headers=self.server.headers) as r:
            if r.status_code != 200:
                raise vllm_error(r.status_code, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    raise vllm_error(doc["error"].get("code") or 500, json.dumps(doc))
                usage = doc.get("usage") or usage
                for c in doc.get("choices", []):
                    if c.get("text") or (c.get("logprobs") or {}).get("tokens"):
                        text.append(c.get("text") or "")
                        request.push(index, Delta(c.get("text") or "", chat_logprobs(c.get("logprobs"))))
                    tops.append(c.get("logprobs"))
                    choice = c if c.get("finish_reason") else choice
        if choice is None or usage is None:  # the stream broke off: vLLM died or dropped the request
            raise unavailable()
        return generation({**choice, "text": "".join(text), "logprobs": merged_logprobs(tops)}, usage)

    def _client(self):
        import httpx2 as httpx

        loop = asyncio.get_running_loop()
        if id(loop) not in self._clients:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._clients[id(loop)] = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout_s, connect=10),
                                                        limits=limits)
        return self._clients[id(loop)]

    def close(self) -> None:
        self.server.stop()


def vllm_launch(base: str, extra_args: tuple[str, ...] = ()):
    """The base model's folder, its context length (as the built-in engine's) and the dtype: float32 on CPUs
    (what the built-in engine computes in, so greedy answers agree), the model's own on GPUs."""
    import torch
    from transformers import AutoConfig

    from tunesmith.models.names import resolve
    from tunesmith.serve.vllm_server import VllmLaunch

    folder = resolve(base)
    length = int(getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", 2048))
    return VllmLaunch(folder, base, length, "auto" if torch.cuda.is_available() else "float32", extra_args=extra_args)


def engine_args() -> tuple[str, ...]:
    """What tunesmith's requests need of vLLM's engine (vLLM 0.32).

    Structured outputs by llguidance (``guidance``), the built-in engine's library, with compact JSON. Under
    ``auto`` vLLM picks a backend per request, but its engine builds one, for the first request that arrives
    (vllm-project/vllm#43920): a schema that vLLM sends to guidance because xgrammar lacks a keyword in it
    (``multipleOf``; ``pattern`` or ``format`` beside a length bound) was compiled by xgrammar all the same when
    another request came first. The request-level ``disable_any_whitespace`` is read by neither backend (only the
    server's setting is). Lark grammars (a JSON answer or tool calls) are llguidance's.

    On a CPU, chunked prefill off: a request with a ``seed`` whose prompt vLLM splits over two steps kills vLLM's
    engine there ("CPU Generator does not use offset": the model runner rewinds that request's generator with a
    call only CUDA generators have). 30 structured requests at once did, and so does one seeded prompt longer than
    the step's 2,048 tokens (tests/test_vllm_structured.py). Without chunking vLLM makes a step as long as the
    context, and a prompt waits for a step with room for all of it."""
    import torch

    args = ("--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True}))
    return args if torch.cuda.is_available() else (*args, "--no-enable-chunked-prefill")


def completion_body(model: str, prompt_ids: list[int], p: GenParams, stream: bool, constraint, logprobs) -> dict:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": p.max_tokens, "temperature": p.temperature,
            "top_p": p.top_p, "stop": list(p.stop), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if p.seed is not None:
        body["seed"] = p.seed
    if p.frequency_penalty or p.presence_penalty:
        body |= {"frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty}
    if p.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
    if constraint is not None:
        body["structured_outputs"] = constraint
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def generation(choice: dict, usage: dict) -> Generation:
    finish = choice.get("finish_reason") if choice.get("finish_reason") in ("stop", "length") else "stop"
    return Generation(choice.get("text") or "", usage["prompt_tokens"], usage["completion_tokens"], finish,
                      chat_logprobs(choice.get("logprobs")))


def chat_logprobs(lp: dict | None) -> list[dict] | None:
    """vLLM's completions logprobs (tokens, token_logprobs, top_logprobs) as chat ``logprobs.content``."""
    if not lp or not lp.get("tokens"):
        return None

    def entry(token: str, logprob: float | None) -> dict:
        value = -9999.0 if logprob is None else max(float(logprob), -9999.0)  # OpenAI's floor for -inf
        return {"token": token, "logprob": value, "bytes": list(token.encode())}

    out = []
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or [],
                                   strict=False):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        out.append(entry(token, logprob) | {"top_logprobs": [entry(t, v) for t, v in ranked]})
    return out


def merged_logprobs(parts: list[dict | None]) -> dict | None:
    """A streamed answer's logprobs pieces as one completions logprobs object."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {k: [x for p in parts for x in (p.get(k) or [])] for k in ("tokens", "token_logprobs", "top_logprobs")}


def error_message(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500]
    doc = doc.get("error", doc) if isinstance(doc, dict) else {}
    return str(doc.get("message") or text)[:2000]


def vllm_error(status: int, text: str) -> APIError:
    """vLLM's error (``{"error": {...}}`` or the older flat shape) as ours, its status and message kept."""
    try:
        doc = json.loads(text)
        doc = doc.get("error", doc)
    except (ValueError, AttributeError):
        doc = {}
    status = int(status) if str(status).isdigit() and 400 <= int(status) < 600 else 500
    if status >= 500:
        return APIError(status, f"The inference engine (vLLM) failed: {error_message(text)}", type_="server_error",
                        code="engine_error")
    param = doc.get("param") if isinstance(doc, dict) else None
    return APIError(status, error_message(text), param=param if isinstance(param, str) else None)


def unavailable() -> APIError:
    return APIError(503, "The inference engine (vLLM) is restarting after it stopped; retry in a minute.",
                    type_="server_error", code="engine_unavailable")
