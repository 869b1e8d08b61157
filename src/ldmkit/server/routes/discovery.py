"""Routes clients call at start-up to learn what we have: models, samplers, schedulers, LoRAs, embeddings,
ControlNets; and the web UI's other lists, answered empty or fixed because we have none of their kind."""

from fastapi import FastAPI

from ldmkit.server.image_prompts import MODULES as IP_MODULES
from ldmkit.server.state import ServerState

SCHEDULERS = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    # a timestep spacing here (diffusion/registry.SPACING_SCHEDULE_TYPES)
    {
        "name": "sgm_uniform",
        "label": "SGM Uniform",
        "aliases": ["SGMUniform"],
        "default_rho": -1,
        "need_inner_model": True,
    },
]
EMPTY_LISTS = (
    "sd-vae",
    "hypernetworks",
    "face-restorers",
    "realesrgan-models",
    "prompt-styles",
)


def add_routes(app: FastAPI, server: ServerState) -> None:
    _add_what_we_have(app, server)
    _add_fixed(app)


def _add_what_we_have(app: FastAPI, server: ServerState) -> None:
    models = server.models

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:
        return [
            {
                "title": models.title(n),
                "model_name": n,
                "hash": (models.short_hash(n) or "")[:10] or None,
                "sha256": models.short_hash(n),
                "filename": str(models.paths[n]),
                "config": None,
            }
            for n in models.paths
        ]

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict]:
        from ldmkit.diffusion.registry import SAMPLERS

        out: dict[str, dict] = {}
        for s in SAMPLERS.values():
            entry = out.setdefault(s.webui_name, {"name": s.webui_name, "aliases": [], "options": {}})
            entry["aliases"].append(s.name)
        return list(out.values())

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict]:
        return [dict(s) for s in SCHEDULERS]

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict]:
        from ldmkit.checkpoints.lora_files import find_lora, list_loras

        lora_dir = server.config.lora_dir
        return [
            {"name": n, "alias": n, "path": str(find_lora(n, lora_dir)), "metadata": {}} for n in list_loras(lora_dir)
        ]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict:
        vectors = models.pipe.embeddings.vectors if models.pipe else {}
        loaded = {
            n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": v.shape[1], "vectors": len(v)}
            for n, v in vectors.items()
        }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict]:
        """The pixel upscalers, then the model upscalers of --upscaler-dir that spandrel recognises, each file
        described once (from its header where it can be): the worker reads a model when a request names it."""
        from ldmkit.errors import ConfigError
        from ldmkit.pipelines.hires import PIXEL_UPSCALERS
        from ldmkit.pipelines.upscalers import describe, find_upscaler, list_upscalers

        out = [
            {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in PIXEL_UPSCALERS
        ]
        folder = server.config.upscaler_dir
        for name in list_upscalers(folder):
            path = find_upscaler(name, folder)
            try:
                found = describe(path)
            except ConfigError:  # not an upscaler: not offered (naming it is refused at generation)
                continue
            entry = {"name": name, "model_name": found.architecture, "model_path": str(path), "model_url": None}
            out.append({**entry, "scale": found.scale})
        return out

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict:
        return {"model_list": models.controlnet_names() + models.image_prompts.names()}

    @app.get("/controlnet/module_list")
    def controlnet_modules() -> dict:
        from ldmkit.pipelines.control import PREPROCESSORS

        return {"module_list": [*PREPROCESSORS, *IP_MODULES]}


def _add_fixed(app: FastAPI) -> None:
    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list:
        return []

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict]:
        from ldmkit.pipelines.hires import LATENT_UPSCALERS

        return [{"name": n} for n in LATENT_UPSCALERS]

    for route in EMPTY_LISTS:
        app.add_api_route(f"/sdapi/v1/{route}", lambda: [], methods=["GET"])

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict:
        return {"api": True, "listen": False}

    @app.get("/sdapi/v1/memory")
    def memory() -> dict:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"ram": {"used": rss}, "cuda": {"error": "no CUDA device"}}

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh() -> dict:
        return {}
