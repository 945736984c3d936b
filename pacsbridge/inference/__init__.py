"""Inference: the worker that scores stored instances, and batch scoring of files for the CLI."""
