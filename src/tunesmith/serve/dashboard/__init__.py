"""The dashboard: one page (``static/``) over the runs folder and the fine-tuning jobs (``routes``).
May import ``serve.api`` (the API key) and ``runs``."""
