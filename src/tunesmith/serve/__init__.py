"""Serving: an OpenAI-compatible API over a base model and LoRA adapters."""
