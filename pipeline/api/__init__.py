"""The HTTP API (aiohttp): the ingest endpoints behind API keys, health and the OpenAPI description.

`create_app(settings)` builds the app, `run_api(settings, host, port)` serves it; `pipeline.api.keys` manages
the API keys.
"""

from pipeline.api.app import create_app, run_api

__all__ = ["create_app", "run_api"]
