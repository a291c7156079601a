"""Formats: OpenAI chat examples checked (``chat``), conversations tokenized (``chat_rows``), tools as the model
was trained on them (``tool_format``), examples as chat messages (``messages``), exports (``exporters``) and
fine-tuning files validated (``validate``). The lowest room of data: imports only the layers below data."""
