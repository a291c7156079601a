"""tunesmith: fine-tune a small language model for one narrow domain, end to end."""

__version__ = "0.1.0"
