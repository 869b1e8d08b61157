"""The HTTP server: serve, and its console (what it is doing, one line per request)."""

import argparse
import errno
import logging
import socket
import time

from ldmkit.cli.common import MODEL_HELP, _log_to_stderr
from ldmkit.errors import LdmkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Console(logging.Formatter):
    """`HH:MM:SS line`: a server's console is read against the clock; levels other than info say so."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{record.getMessage()}"


def console_level(args) -> int:
    """The requests are what a server's operator watches: INFO by default (other commands show
    warnings only); -q warnings and errors; -v debug lines too (progress polls, model loads)."""
    verbose = getattr(args, "verbose", False)
    if verbose and args.quiet:
        raise LdmkitError("-v and -q: give one of them")
    return logging.DEBUG if verbose else logging.WARNING if args.quiet else logging.INFO


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (a port in use is said at once, not after the
    load); the address line names the port it got (--port 0: a free one)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = " (another server is there: --port picks another)" if e.errno == errno.EADDRINUSE else ""
        raise LdmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _run(app, host: str, sock: socket.socket) -> None:
    """Uvicorn on our socket, its own access log off (each request is our line already)."""
    import uvicorn

    from ldmkit.server.console import announce_stopping

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # the running generation finishes first: say why nothing ends yet
                announce_stopping()
            super().handle_exit(sig, frame)

    sock.listen(2048)  # before the app starts: `ready` then means a browser's connection is taken
    port = sock.getsockname()[1]
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has stopped cleanly
        pass
    finally:
        sock.close()


def cmd_serve(args) -> int:
    _log_to_stderr(console_level(args), _Console())
    from ldmkit.server.app import Limits, ServeConfig, create_app
    from ldmkit.server.console import announce_address

    if args.api_auth and ":" not in args.api_auth:
        raise LdmkitError("--api-auth: expected USER:PASS")
    if args.host not in LOOPBACK and not (args.api_key or args.api_auth or args.insecure):
        raise LdmkitError(
            f"--host {args.host}: binding beyond this machine needs --api-key KEY or --api-auth USER:PASS "
            "(or --insecure to serve without credentials)"
        )
    bounds = ("max_pixels", "max_steps", "max_images", "max_prompt_chars", "max_input_pixels", "max_prompt_chunks")
    bounds += ("max_frames",)
    if not 0 <= args.port <= 65535:
        raise LdmkitError(f"--port {args.port}: allowed: 0 (a free one) to 65535")
    for name in (*bounds, "max_queue", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise LdmkitError(f"--{name.replace('_', '-')}: allowed: 1 or more")
    limits = Limits(
        **{name: getattr(args, name) for name in bounds},
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_mb * 2**20,
    )
    from ldmkit.checkpoints.ip_adapter_files import is_ip_adapter_file

    for path in args.ip_adapter or []:
        if not is_ip_adapter_file(path):
            raise LdmkitError(f"--ip-adapter {path}: no IP-Adapter file there (image_proj.* and ip_adapter.* weights)")
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
        upscaler_dir=args.upscaler_dir,
        tiny_decoder=args.tiny_decoder,
        backend=args.backend,
        ip_adapters=list(args.ip_adapter or []),
        image_encoders=list(args.image_encoder or []),
        video_models=list(args.video_model or []),
    )
    if args.backend == "openvino":
        from ldmkit.models.openvino_backend import require_openvino

        require_openvino()
    from ldmkit.bundled import resolve

    resolve(args.model)  # a missing model is one line now, not a failure inside the server
    sock = _bind(args.host, args.port)
    try:
        app = create_app(config)
        app.state.ready.result()
    except BaseException:
        sock.close()
        raise
    announce_address(args.host, sock.getsockname()[1], credentials=bool(args.api_key or args.api_auth))
    _run(app, args.host, sock)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve the popular web UI's HTTP API and a web page")
    # -v here as well as before the command; SUPPRESS: not given here, `ldmkit -v serve` keeps its -v
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug lines too")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no request lines")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--models-dir", help="a folder of checkpoints to offer in the model list")
    p.add_argument("--controlnet", action="append", help="a ControlNet file to offer by name (repeatable)")
    p.add_argument("--ip-adapter", action="append", help="an IP-Adapter file to offer by name (repeatable)")
    p.add_argument(
        "--video-model", action="append", help="a video model to offer by name at /ldmkit/v1/video (repeatable)"
    )
    p.add_argument("--max-frames", type=int, default=32, help="most frames a video request may ask for")
    p.add_argument(
        "--image-encoder",
        action="append",
        metavar="DIR_OR_FILE",
        help="a CLIP vision tower for the IP-Adapters (repeatable; each adapter takes the one of its width; default:"
        " image_encoder/ beside the adapter)",
    )
    p.add_argument("--lora-dir", help="LoRA folder: /sdapi/v1/loras lists it, prompts use <lora:NAME:WEIGHT>")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument(
        "--upscaler-dir", help="model upscalers (ESRGAN...): /sdapi/v1/upscalers lists them, hr_upscaler names them"
    )
    p.add_argument(
        "--tiny-decoder",
        metavar="FILE_OR_DIR",
        help="a TAESD decoder, or a folder searched per model for its family's (taesd_decoder.* for SD 1.x/2.x, "
        "taesdxl_decoder.* for SDXL...): live previews (show_progress_type TAESD) and fast decodes "
        "(sd_vae_decode_method TAESD)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "openvino"],
        default="torch",
        help="what runs each model's UNet/transformer: torch (default) or openvino (see generate --backend)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="0: a free port, named at start")
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
