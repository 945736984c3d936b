"""Read-only HTTP API (FastAPI): the worklist, health and Prometheus metrics."""
