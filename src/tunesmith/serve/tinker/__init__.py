"""The Tinker API: clients of the ``tinker`` SDK drive LoRA training and sampling of the served base step by step."""
