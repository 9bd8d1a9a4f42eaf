"""Inference: separating arrays and files, the separators behind `separate`, the Python API, streaming."""
