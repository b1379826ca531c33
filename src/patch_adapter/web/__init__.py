"""`patch-adapter serve`: a local web app to paint masks and inpaint 4K-16K pictures.

Only the command's arguments live here, so that `patch-adapter --help` does not import
the web server; `server.py` holds the app, `jobs.py` the queue and progress, and
`static/` the page (plain JS, no build step).
"""

from __future__ import annotations

DEFAULT_PORT = 7860
DEFAULT_UPLOAD_MB = 300


def add_serve_parser(subparsers) -> None:
    from ..cli import add_model_options

    p = subparsers.add_parser(
        "serve",
        help="start the local web app (paint a mask, plan, inpaint, compare, download)",
        description="Serve a page on http://HOST:PORT to open a picture, paint a mask, see the patch plan, "
        "run Patch-Adapter or a baseline with live progress, compare and download the full-resolution "
        "result. Uploads and results live in a temporary folder removed at exit.",
    )
    add_model_options(p, with_scheduler=False)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; another value exposes the app "
        "to the network, without authentication)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_UPLOAD_MB,
        help=f"largest upload accepted, in MB (default {DEFAULT_UPLOAD_MB})",
    )
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from .server import serve

    return serve(args)
