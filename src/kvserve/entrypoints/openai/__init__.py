"""The OpenAI-compatible HTTP API: protocol (pydantic models), serving_* (one file per route family),
errors, and api_server (the FastAPI app and `kvserve serve`)."""
