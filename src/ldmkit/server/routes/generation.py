"""Routes that make images (txt2img, img2img) and read them back (png-info)."""

import threading

from fastapi import FastAPI

from ldmkit.server.generation import generate
from ldmkit.server.state import ServerState
from ldmkit.server.webui import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest, decode_image

DECODING = threading.BoundedSemaphore(2)


def add_routes(app: FastAPI, server: ServerState) -> None:
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest) -> dict:
        return await generate(server, req, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest) -> dict:
        return await generate(server, req, "img2img")

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest) -> dict:
        from ldmkit.images import parse_infotext

        with DECODING:  # request threads decode here: a few at a time, so memory stays bounded
            image = decode_image(req.image, "image", server.config.limits.max_input_pixels)
        text = image.info.get("parameters", "")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, fields = parse_infotext(text)
        return {"info": text, "items": items, "parameters": {"Prompt": prompt, "Negative prompt": negative, **fields}}
