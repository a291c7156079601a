"""What a JSON-schema constraint costs: `tunesmith serve` answering free text vs `response_format` with a 5-field
object and with a nested one, on the built-in engine (llguidance's mask in the decoding loop) and on `--engine vllm`
(vLLM's structured outputs).

Each engine is started as a user starts it (one at a time); every request is streamed one at a time, greedy, through
the official client, over the same prompts for the three formats. Prints per engine and format: first-token
latency (request sent to first content delta; p50) and decoding tokens/s (completion tokens over the time after the
first token), the constrained rows' ratio to free text, and how many constrained answers validate (jsonschema).

    python benchmarks/structured_outputs.py [--engines builtin vllm] [--requests 8] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_engines import Served  # noqa: E402 - the server started as a user starts it

PEOPLE = ["Alice, 31, a nurse from Paris", "Bob, 45, a baker from Lyon", "Chen, 28, an engineer from Taipei",
          "Dana, 52, a teacher from Austin", "Emeka, 39, a pilot from Lagos", "Fatima, 24, a student from Rabat",
          "Goran, 61, a farmer from Split", "Hana, 35, a doctor from Seoul"]


def obj(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


FLAT = obj({"name": {"type": "string"}, "age": {"type": "integer"}, "job": {"type": "string"},
            "city": {"type": "string"}, "retired": {"type": "boolean"}})
NESTED = obj({"person": obj({"name": {"type": "string"}, "age": {"type": "integer"}}),
              "work": obj({"job": {"type": "string"}, "place": obj({"city": {"type": "string"},
                                                                     "country": {"type": "string"}})}),
              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}})
FORMATS = {"free text": None, "5-field object": FLAT, "nested object": NESTED}


def one(client, model: str, person: str, schema: dict | None, max_tokens: int) -> dict:
    kw = {} if schema is None else {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": schema, "strict": True}}}
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    for chunk in client.chat.completions.create(
            model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Describe {person}, in JSON."}], **kw):
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text += choice.delta.content
        usage = chunk.usage or usage
    end = time.perf_counter()
    valid = None
    if schema is not None:
        try:
            jsonschema.validate(json.loads(text), schema)
            valid = True
        except (ValueError, jsonschema.ValidationError):
            valid = False
    return {"first_s": first - t0, "decode_s": end - first, "tokens": usage.completion_tokens, "valid": valid}


def measure(engine: str, args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Served(engine, args.model, [], Path(tmp))
        try:
            client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=1800)
            for schema in FORMATS.values():  # warm-up (the schema compiled once), not counted
                one(client, args.model, PEOPLE[0], schema, 16)
            for name, schema in FORMATS.items():
                load = os.getloadavg()[0]
                runs = [one(client, args.model, p, schema, args.max_tokens) for p in PEOPLE[: args.requests]]
                tokens, decode = sum(r["tokens"] for r in runs), sum(r["decode_s"] for r in runs)
                row = {"first_token_p50_s": round(statistics.median(r["first_s"] for r in runs), 3),
                       "tok_per_s": round(tokens / decode, 2), "tokens": tokens,
                       "valid": None if schema is None else sum(bool(r["valid"]) for r in runs),
                       "load_before": load, "load_after": os.getloadavg()[0]}
                out[name] = row
                print(f"{engine:8} {name:15} first token p50 {row['first_token_p50_s']:6.3f} s  "
                      f"{row['tok_per_s']:7.2f} tok/s  ({tokens} tokens)  valid {row['valid']}  "
                      f"load {load:.1f}->{row['load_after']:.1f}", flush=True)
        finally:
            server.stop()
    free = out["free text"]
    for name in list(FORMATS)[1:]:
        print(f"{engine:8} {name:15} vs free text: tokens/s {out[name]['tok_per_s'] / free['tok_per_s']:.2f}x, "
              f"first token {out[name]['first_token_p50_s'] / free['first_token_p50_s']:.2f}x", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--engines", nargs="+", default=["builtin", "vllm"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    results = {engine: measure(engine, args) for engine in args.engines}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
