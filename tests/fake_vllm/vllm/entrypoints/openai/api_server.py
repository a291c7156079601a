"""A stand-in for vLLM's OpenAI server (tests only): the same module path, command-line options and routes that
tunesmith uses, so the real launch (shim, private socket, key, middleware, network namespace, restarts) runs
in `make test` without vLLM. It answers ``/v1/completions`` with the words of ``WORDS`` one token at a time.

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
        words = (WORDS * 100)[: body["max_tokens"]]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(words)}
        if not body.get("stream"):
            await asyncio.sleep(STEP_S * len(words))
            choice = {"text": " ".join(words), "finish_reason": "length"}
            if body.get("return_token_ids"):
                choice["token_ids"] = list(range(len(words)))
            if body.get("structured_outputs"):  # what was asked, so a test can see it arrived
                choice["text"] = json.dumps({"schema": body["structured_outputs"]["json"]})
            return {"choices": [choice], "usage": usage}

        async def chunks():
            for i, word in enumerate(words):
                await asyncio.sleep(STEP_S)
                text = word if i == 0 else " " + word
                last = i == len(words) - 1
                yield f"data: {json.dumps({'choices': [{'text': text, 'finish_reason': 'length' if last else None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    for middleware in args.middleware:  # as vLLM's --middleware: module.Class
        module, name = middleware.rsplit(".", 1)
        app.add_middleware(getattr(importlib.import_module(module), name))
    uvicorn.run(app, uds=args.uds, log_level="warning")


if __name__ == "__main__":
    main()
