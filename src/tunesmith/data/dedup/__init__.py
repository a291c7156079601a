"""Dedup: near dedup by MinHash LSH (``minhash``), Jaccard sketches and exact Jaccard (``jaccard``), and the
exact and near indexes the engines keep between batches (``index``). May import ``data.formats``,
``data.tokens``, ``data.read`` and the layers below data; never ``steps`` or ``engines``."""
