"""Hydra entry points, config validation, the staged pipeline runner and its workers."""
