"""A stand-in for vLLM's OpenAI server (tests only): the same module path, command-line options and routes that
tunesmith uses, so the real launch (shim, private socket, key, middleware, network namespace, restarts) runs
in `make test` without vLLM. It answers ``/v1/completions`` with the words of ``WORDS`` one token at a time, each
word one token id of ``WORD_IDS``; like a greedy model, it goes on from the words that end the prompt, so a request
whose prompt is another's prompt plus its first tokens answers the rest of that answer. ``GET /fake/state`` tells
which streams are open (the first two prompt ids of each), how many were closed by their client before the end, and,
by a prompt's first id, the most streams at once that had not yet sent their first token (a prefill's worth).

An adapter folder steers it: ``adapter_config.json`` with ``"fake": "hang"`` never answers, ``"fake": "broken"``
answers 200 with a body that is not JSON, ``"fake": "refuse"`` is refused at load (as a rank above
--max-lora-rank is); a folder without adapter_config.json is refused as vLLM refuses a missing one.
"""

import argparse
import asyncio
import importlib
import json
import os
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

WORDS = "one two three four five six seven eight nine ten".split()
WORD_IDS = list(range(300, 300 + len(WORDS)))  # ids a byte-level vocabulary of a few hundred decodes as ASCII
STEP_S = float(os.environ.get("FAKE_VLLM_STEP_S", "0.05"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--served-model-name")
    ap.add_argument("--uds")
    ap.add_argument("--middleware", action="append", default=[])
    args, _ = ap.parse_known_args()
    app = FastAPI()
    adapters: dict[str, dict] = {}
    streams = {"open": [], "closed_early": 0, "sent": 0, "most_unprefilled": {}}
    unprefilled: list[int] = []

    @app.get("/fake/state")
    async def state():
        return streams

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "max_model_len": 2048}
                                           for m in [args.served_model_name, *adapters]]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("fake_vllm_requests 1\n")

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        config = Path(body["lora_path"]) / "adapter_config.json"
        if not config.is_file():
            return JSONResponse({"error": {"message": f"No adapter found for {body['lora_path']}", "code": 400}}, 400)
        doc = json.loads(config.read_text())
        if doc.get("fake") == "refuse":
            return JSONResponse({"error": {"message": "LoRA rank 128 is greater than max_lora_rank 64.",
                                           "code": 400}}, 400)
        if body["lora_name"] in adapters:
            return JSONResponse({"error": {"message": "The lora adapter is already loaded.", "code": 400}}, 400)
        adapters[body["lora_name"]] = doc
        return PlainTextResponse("Success")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        name = (await request.json())["lora_name"]
        if adapters.pop(name, None) is None:
            return JSONResponse({"error": {"message": f"The lora adapter '{name}' cannot be found.", "code": 404}}, 404)
        return PlainTextResponse("Success")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model = body["model"]
        if model != args.served_model_name and model not in adapters:
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.", "code": 404}}, 404)
        behaviour = adapters.get(model, {}).get("fake")
        if behaviour == "hang":
            await asyncio.sleep(3600)
        if behaviour == "broken":
            return PlainTextResponse("this is not json")
        done = said(body["prompt"])
        ids = [WORD_IDS[(done + i) % len(WORDS)] for i in range(body["max_tokens"])]
        words = [WORDS[WORD_IDS.index(t)] for t in ids]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(words)}
        streams["sent"] += 1
        if not body.get("stream"):
            await asyncio.sleep(STEP_S * len(words))
            choice = {"text": " ".join(words) if not done else "".join(" " + w for w in words),
                      "finish_reason": "length"}
            if body.get("return_token_ids"):
                choice["token_ids"] = ids
            if body.get("structured_outputs"):  # what was asked, so a test can see it arrived
                choice["text"] = json.dumps({"schema": body["structured_outputs"]["json"]})
            return {"choices": [choice], "usage": usage}

        async def chunks():
            head = body["prompt"][:2]
            streams["open"].append(head)
            unprefilled.append(head[0])
            most = streams["most_unprefilled"]
            most[str(head[0])] = max(most.get(str(head[0]), 0), unprefilled.count(head[0]))
            ended = prefilled = False
            try:
                for i, (word, token) in enumerate(zip(words, ids, strict=True)):
                    await asyncio.sleep(STEP_S)
                    if not prefilled:
                        unprefilled.remove(head[0])
                        prefilled = True
                    choice = {"text": word if i == 0 and not done else " " + word,
                              "finish_reason": "length" if i == len(words) - 1 else None}
                    if body.get("return_token_ids"):
                        choice["token_ids"] = [token]
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not prefilled:
                    unprefilled.remove(head[0])
                streams["open"].remove(head)
                streams["closed_early"] += not ended

        return StreamingResponse(chunks(), media_type="text/event-stream")

    def said(prompt: list[int]) -> int:
        """The words already answered: the word ids that end the prompt."""
        n = 0
        while n < len(prompt) and prompt[-1 - n] in WORD_IDS:
            n += 1
        return n

    for middleware in args.middleware:  # as vLLM's --middleware: module.Class
        module, name = middleware.rsplit(".", 1)
        app.add_middleware(getattr(importlib.import_module(module), name))
    uvicorn.run(app, uds=args.uds, log_level="warning")


if __name__ == "__main__":
    main()
