"""How the server answers what it refuses: one shape for every error, `{"error": <kind>, "detail":
<one line>}`, documented for every route in the OpenAPI document; a full queue answered 503 with
Retry-After."""

import json

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

RETRY_AFTER = 10  # seconds a client is told to wait when the queue is full
ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}
ERROR_STATUSES = {
    "400": "The request could not be read",
    "401": "Credentials missing or wrong",
    "404": "A model, ControlNet or route that is not offered",
    "413": "The request body is over the server's limit",
    "422": "A field the server understands but refuses, with the reason",
    "503": "The queue is full: try again after Retry-After seconds",
}


def error_body(kind: str, detail: str) -> dict:
    return {"error": kind, "detail": detail}


class DeclaredBodyLimit:
    """ASGI middleware: a body whose declared Content-Length is over `limit` is refused with 413 in the
    error shape before any of it is read (bodies without a length are counted as they arrive by
    Starlette's RequestBodyLimitMiddleware)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                body = json.dumps(error_body("RequestTooLarge", body_limit_detail(self.limit))).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 413, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def body_limit_detail(limit: int) -> str:
    return f"request body over {limit} bytes; allowed: at most {limit} (ldmkit serve --max-body-mb)"


def document_errors(app: FastAPI) -> None:
    """Every operation's error answers in the OpenAPI document, in the shape they are sent."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas["Error"] = ERROR_SCHEMA
            content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    for status, text in ERROR_STATUSES.items():
                        responses[status] = {"description": text, "content": content}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
