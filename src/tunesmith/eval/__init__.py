"""Evaluation: contenders, metrics, baselines and the report (generation and label scoring: tunesmith.generation)."""
