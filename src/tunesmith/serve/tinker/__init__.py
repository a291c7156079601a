"""The Tinker room: the Tinker SDK's API (``/api/v1``), clients driving LoRA training and sampling of the served base
call by call (docs/tinker.md). It may import the rooms below it: api (the key, the store lane), lanes, store (its
tables' schema is the store's migrations; its rows are read and written here, ``tinker/store.py``), errors and room."""
