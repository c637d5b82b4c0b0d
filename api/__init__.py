"""The REST restore API (FastAPI)."""
