"""The FastAPI app. ``python src/morag/api/main.py`` serves it on port 8000."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script from a checkout: make ``morag`` importable without installing.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastapi import FastAPI  # noqa: E402

from morag.api.errors import install_error_handlers  # noqa: E402
from morag.api.routes import health  # noqa: E402
from morag.core.config import Settings, settings  # noqa: E402
from morag.core.logging import configure_logging  # noqa: E402


def create_app(cfg: Settings = settings) -> FastAPI:
    app = FastAPI(
        title="morag",
        version="0.1.0",
        description="Asynchronous ingestion: documents, audio, video and web pages become "
        "Markdown and retrieval-ready chunks.",
    )
    install_error_handlers(app)
    app.include_router(health.router)
    return app


app = create_app()


def serve(host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        app,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    serve()
