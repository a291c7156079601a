"""Data stage: read records, curate them, map them to examples, split, format.

Rooms, each a folder, bottom to top (imports run upward only: ``tests/test_import_graph.py`` checks it against
the Rooms block of docs/architecture.md):

- ``formats/``: chat examples checked, conversations tokenized, tools in the prompt, examples as chat
  messages, exports and OpenAI fine-tuning files validated.
- ``tokens.py``: token counts and the data stage's tokenizer.
- ``read/``: a file's rows one at a time, hub datasets and documents, sources read in batches.
- ``dedup/``: exact and near dedup (MinHash LSH, Jaccard sketches) and the indexes kept between batches.
- ``steps/``: curation steps (each a keep-or-drop over records, unaware of which engine runs it), the
  seeded split and records → examples.
- ``engines/``: the engines that run the steps: the local stream (with its second process) and Ray.
- ``profile.py`` and ``prepare.py``: the data profile and the data stage with its cache.
"""
