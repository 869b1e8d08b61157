"""What `ldmkit serve` tells its operator, through the "ldmkit.server" logger (the CLI decides which
levels reach the console): the models found, the address, `ready`, and one line per request -- method,
path, status and seconds, and for a generation its size, steps and images.

Never in a line: a query string, a header (credentials live there) or a prompt. Progress polls are
DEBUG: a page polls several times a second while it waits. Answers of 500 and up are WARNING, so that
`-q` still shows them."""

import asyncio
import logging
import time
from concurrent.futures import Future
from urllib.parse import quote

from fastapi import Request

from ldmkit.server.registry import Models
from ldmkit.server.webui import GenerationRequest

log = logging.getLogger("ldmkit.server")

POLLED = {"/sdapi/v1/progress"}
GENERATION = {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
SUMMARY = "ldmkit_generation"  # the key of a generation's summary in the request's state
PATH_CHARS = 200  # a longer path is cut: one request is one short line


def announce_models(models: Models) -> None:
    n = len(models.paths)
    log.info("%d model%s found; loading the default: %s", n, "" if n == 1 else "s", models.title(models.default))


def address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_address(host: str, port: int, credentials: bool) -> None:
    url = address(host, port)
    note = " (credentials required)" if credentials else ""
    log.info("serving the page at %s and the API docs at %s/docs%s", url, url, note)


def announce_stopping() -> None:
    log.info("stopping: the requests under way finish first (Ctrl-C again: stop now)")


async def announce_ready(loaded: Future) -> None:
    """`ready` once the default model is loaded. Under `ldmkit serve` the socket is already listening
    when the app starts (cli/serve.py listens first), so `ready` means a browser gets an answer."""
    try:
        await asyncio.wrap_future(loaded)
    except Exception as e:  # the first request that needs the model tries again, and says why it fails
        log.warning("the default model did not load: %s", e)
        return
    log.info("ready")


def _count(value) -> str:
    """A request's number as the console shows it: a plain int, or `?` (a line must stay one short line
    whatever a client sends)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**12:
        return str(value)
    return "?"


def _default(name: str):
    return GenerationRequest.model_fields[name].default


def summary(body) -> str:
    """`WxH, N steps, M images` of a generation request's JSON body; `model's` where it leaves the
    size or steps to the model."""
    if not isinstance(body, dict):
        return ""
    width, height, steps = (body.get(k) for k in ("width", "height", "steps"))
    size = "model's size" if width is None and height is None else f"{_count(width)}x{_count(height)}"
    steps = "model's steps" if steps is None else f"{_count(steps)} steps"
    batch, n_iter = (body.get(k, _default(k)) for k in ("batch_size", "n_iter"))
    images = "?"
    if _count(batch) != "?" and _count(n_iter) != "?":
        images = _count(batch * n_iter)
    return f"{size}, {steps}, {images} image{'' if images == '1' else 's'}"


def _json_body(content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def note_generation(request: Request) -> None:
    """An app-wide dependency: a generation's summary in the request's state, for RequestLog. FastAPI
    has read and parsed a JSON body before it solves dependencies, and the request keeps the parsed
    body: reading it here parses nothing twice."""
    route = request.scope.get("route")
    if getattr(route, "path", None) not in GENERATION or not _json_body(request.headers.get("content-type")):
        return
    try:
        body = await request.json()
    except ValueError:  # FastAPI answers it 422; the line says so without a summary
        return
    setattr(request.state, SUMMARY, summary(body))


def _shown(text: str, limit: int) -> str:
    """Percent-encoded (no control character or space can forge a line) and cut to `limit`."""
    text = quote(text, safe="/-._~!$&'()*+,;=:@%")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RequestLog:
    """ASGI middleware, outermost of the app's own: one line per HTTP request once its answer is sent,
    so that answers from the other middleware (401, 413) are logged too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # request.state: where note_generation leaves its summary
        start = time.perf_counter()
        status = None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status = status or 500
            raise
        finally:
            self._line(scope, status, time.perf_counter() - start, state.get(SUMMARY))

    @staticmethod
    def _line(scope, status: int | None, seconds: float, generation: str | None) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in POLLED else logging.INFO
        if status is None or status >= 500:
            level = logging.WARNING
        method, path = _shown(scope.get("method", ""), 16), _shown(path, PATH_CHARS)
        extra = f" ({generation})" if generation else ""
        log.log(level, "%s %s %s %.2f s%s", method, path, status or "-", seconds, extra)
