"""The Tinker room: the Tinker SDK's API (``/api/v1``), clients driving LoRA training and sampling of the served base
call by call (docs/tinker.md). It may import the rooms below it: api (the key, the store lane), lanes, store (its
rows in ``store/tinker.py``), errors and room."""
