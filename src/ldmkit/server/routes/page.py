"""The web page, and what it needs besides the web UI's API."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from ldmkit import __version__
from ldmkit.server.state import ServerState

STATIC = Path(__file__).parent.parent / "static"


def add_routes(app: FastAPI, server: ServerState) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/ldmkit/info", include_in_schema=False)
    def ldmkit_info() -> dict:
        """What the page needs besides the web UI's API: the loaded model's own image size."""
        pipe = server.models.pipe
        return {"version": __version__, "image_size": pipe.model.config.image_size if pipe else None}
