"""Data stage: read records, map them to examples, split, format."""
