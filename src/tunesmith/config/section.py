"""The base of every recipe section: an unknown key is refused (config.loading names the closest valid one)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


ENGINE_HELP = ("auto (the engine measured faster on this device, machine/engine_measured.json; builtin where "
               "nothing was measured), builtin (in this process), vllm (a vLLM server tunesmith starts for the time "
               "it takes; `make vllm`), or the http(s):// URL of a vLLM-compatible server that loads adapters at run "
               "time (its key in $TUNESMITH_ENGINE_API_KEY)")


def check_engine(value: str) -> str:
    """An ``engine`` key: auto, builtin, vllm or an http(s):// URL."""
    if value in ("auto", "builtin", "vllm") or value.startswith(("http://", "https://")):
        return value
    raise ValueError(f"engine is auto, builtin, vllm or an http(s):// URL, got '{value}'")
