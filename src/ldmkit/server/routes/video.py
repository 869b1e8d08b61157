"""The video route: one clip per request, from an image or a prompt (server/video.py)."""

from fastapi import FastAPI

from ldmkit.server.state import ServerState
from ldmkit.server.video import VideoRequest, make_video


def add_routes(app: FastAPI, server: ServerState) -> None:
    @app.post("/ldmkit/v1/video")
    async def video(req: VideoRequest) -> dict:
        """A clip as base64 in `format` (webp, gif, png: animated, mp4), its parameters, seed, frames and fps."""
        return await make_video(server, server.videos, req)
