"""The HTTP server: serve."""

from ldmkit.cli.common import MODEL_HELP
from ldmkit.errors import LdmkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> int:
    import uvicorn

    from ldmkit.server.app import Limits, ServeConfig, create_app

    if args.api_auth and ":" not in args.api_auth:
        raise LdmkitError("--api-auth: expected USER:PASS")
    if args.host not in LOOPBACK and not (args.api_key or args.api_auth or args.insecure):
        raise LdmkitError(
            f"--host {args.host}: binding beyond this machine needs --api-key KEY or --api-auth USER:PASS "
            "(or --insecure to serve without credentials)"
        )
    bounds = ("max_pixels", "max_steps", "max_images", "max_prompt_chars", "max_input_pixels", "max_prompt_chunks")
    for name in (*bounds, "max_queue", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise LdmkitError(f"--{name.replace('_', '-')}: allowed: 1 or more")
    limits = Limits(
        **{name: getattr(args, name) for name in bounds},
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_mb * 2**20,
    )
    config = ServeConfig(
        args.model,
        args.models_dir,
        list(args.controlnet or []),
        args.lora_dir,
        args.embeddings_dir,
        args.outputs,
        args.api_key,
        args.api_auth,
        limits,
    )
    from ldmkit.bundled import resolve

    resolve(args.model)  # a missing model is one line now, not a failure inside the server
    app = create_app(config)
    app.state.ready.result()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve the popular web UI's HTTP API and a web page")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--models-dir", help="a folder of checkpoints to offer in the model list")
    p.add_argument("--controlnet", action="append", help="a ControlNet file to offer by name (repeatable)")
    p.add_argument("--lora-dir", help="LoRA folder: /sdapi/v1/loras lists it, prompts use <lora:NAME:WEIGHT>")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY, or X-API-Key)")
    p.add_argument("--api-auth", help="require HTTP Basic credentials USER:PASS")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without credentials")
    p.add_argument("--outputs", default="outputs", help="where every image is saved (default ./outputs)")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="largest width x height")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="largest batch_size x n_iter")
    p.add_argument("--max-prompt-chars", type=int, default=4000)
    p.add_argument(
        "--max-input-pixels", type=int, default=4 * 1024 * 1024, help="largest width x height of an uploaded image"
    )
    p.add_argument("--max-prompt-chunks", type=int, default=8, help="75-token chunks a prompt may take (BREAK: one)")
    p.add_argument("--max-queue", type=int, default=32, help="jobs waiting; more are answered 503 with Retry-After")
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body, base64 images included")
    p.set_defaults(func=cmd_serve)
