"""Pruning methods. Structured/random remove whole channels and heads; semi/unstructured zero weights."""
