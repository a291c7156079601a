"""Reading: a file's rows one at a time (``readers``), hub datasets and documents (``sources``), sources read
in batches (``batches``). May import ``data.formats``, ``data.tokens`` and the layers below data."""
