"""OpenAI-compatible HTTP front end over the engine (FastAPI + uvicorn)."""
