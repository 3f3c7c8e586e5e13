"""Evaluation: zero-shot classification and retrieval metrics, and the evaluation suites."""
