"""Evaluation: batched generation, label scoring, metrics, baselines."""
