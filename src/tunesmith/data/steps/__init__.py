"""Steps over records: curation (``curation``: filters, scrub, dedup, balance; each says keep, or drop with a
reason), the seeded split (``split``) and records → examples (``examples``). A step does not know which engine
runs it: it imports ``data.dedup``, ``data.read``, ``data.formats``, ``data.tokens`` and the layers below data,
never ``data.engines``."""
