"""The web page, and what it needs besides the web UI's API."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from ldmkit import __version__
from ldmkit.server.state import ServerState

STATIC = Path(__file__).parent.parent / "static"


def add_routes(app: FastAPI, server: ServerState) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)  # no icon: an empty answer, not a 404 in the browser's console

    @app.get("/ldmkit/info", include_in_schema=False)
    def ldmkit_info(model: str | None = None) -> dict:
        """What the page needs besides the web UI's API: a model's own settings (the loaded one's unless
        `model` names another), so that the page starts from what the model was made for, and whether
        the server has a tiny decoder (the page then offers TAESD previews and decodes)."""
        return {
            "version": __version__,
            "tiny_decoder": bool(server.config.tiny_decoder),
            "ip_adapters": server.models.image_prompts.names(),  # the page's image-prompt picker
            "video_models": server.videos.names(),  # the page's video section
            **model_settings(server, model),
        }


def model_settings(server: ServerState, title: str | None) -> dict:
    """A model's image size, steps, guidance and sampler (by its web UI name and schedule type): exact
    for the loaded model, its chosen settings for a bundled one, ldmkit's defaults otherwise (the size
    is known once it is loaded)."""
    from ldmkit.bundled import BUNDLED
    from ldmkit.diffusion.registry import SAMPLERS
    from ldmkit.pipelines.params import CALL_DEFAULTS

    models = server.models
    name = models.find(title) if title else (models.loaded or models.default)
    pipe = models.pipe if models.loaded == name else None
    if pipe is not None:
        defaults, size = pipe.defaults, pipe.model.config.image_size
    else:
        defaults, size = {**CALL_DEFAULTS, **(BUNDLED[name].defaults if name in BUNDLED else {})}, None
    spec = SAMPLERS[defaults["sampler"]]
    return {
        "model": models.title(name),
        "image_size": size,
        "steps": defaults["steps"],
        "cfg_scale": defaults["cfg"],
        "sampler_name": spec.webui_name,
        "scheduler": spec.webui_schedule,
    }
