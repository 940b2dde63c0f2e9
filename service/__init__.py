"""OCD Serve HTTP service: FastAPI app, dynamic batcher of per-request deltas, metrics."""
