"""The HTTP service: FastAPI routes, auth, the predictor cache and micro-batcher."""
