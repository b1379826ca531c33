"""The web app: a small Starlette (ASGI) server and its own page.

Why not gradio: an 8192x5464 picture must open, pan and take brush strokes smoothly, and
the mask that runs must be exactly the mask on screen. Gradio's image editor round-trips
the whole picture through base64 and paints at display resolution; here the page keeps
the mask as a bitmap of the picture's own size (one cell per pixel up to 8192 px a side,
2x2 above) and sends it packed (1 bit a cell). The server only moves files and values
between the page and the package: `image_io` reads and writes, `planning` plans,
`PatchAdapterPipeline` inpaints.

Safety: the app answers only requests whose Host (and Origin, when sent) name this server
(DNS rebinding, cross-site requests to a local port); uploads are capped while they
stream in; files live under one temporary folder, named by random ids, never by a path
the page sends.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..cli import output_metadata, pipeline_kwargs
from ..image_io import (
    ImageInputError,
    LoadedImage,
    atomic_write,
    from_float,
    load_image,
    load_mask,
    save_image,
    to_float,
)
from ..masks import latent_mask, mask_bbox
from ..settings import METHODS
from . import DEFAULT_UPLOAD_MB
from .jobs import (
    Job,
    JobQueue,
    SettingsError,
    latent_factor_for,
    native_size_for,
    parse_settings,
    plan_for,
    plan_json,
    progress_class,
    settings_dict,
    settings_schema,
)

STATIC = Path(__file__).parent / "static"
MAX_SIDE = 16384  # the largest picture the page opens
FULL_MASK_SIDE = 8192  # above this, one mask cell covers 2x2 (or more) pixels
ID = re.compile(r"^[0-9a-f]{16}$")


class UploadTooLarge(Exception):
    pass


class NotFound(Exception):
    pass


@dataclass
class ImageEntry:
    id: str
    path: Path
    name: str
    width: int
    height: int
    bit_depth: int
    cell: int  # one mask cell covers cell x cell pixels
    mask: np.ndarray | None = None  # (height, width) bool, full resolution
    mask_version: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) of the mask the page paints."""
        return -(-self.height // self.cell), -(-self.width // self.cell)

    def to_json(self) -> dict:
        grid_h, grid_w = self.grid
        return {
            "id": self.id,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "bit_depth": self.bit_depth,
            "cell": self.cell,
            "mask_width": grid_w,
            "mask_height": grid_h,
        }


@dataclass
class ResultEntry:
    id: str
    image_id: str
    path: Path
    name: str
    settings: dict
    bbox: tuple[int, int, int, int]
    unet_forwards: int
    seconds: float
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "image_id": self.image_id,
            "name": self.name,
            "settings": self.settings,
            "bbox": self.bbox,
            "unet_forwards": self.unet_forwards,
            "seconds": round(self.seconds, 2),
            "created": self.created,
            "url": f"/api/results/{self.id}.png",
        }


def cell_for(width: int, height: int) -> int:
    return max(1, math.ceil(max(width, height) / FULL_MASK_SIDE))


def expand_grid(grid: np.ndarray, cell: int, height: int, width: int) -> np.ndarray:
    """The page's mask grid at full resolution: each cell becomes cell x cell pixels, exactly."""
    if cell == 1:
        return grid[:height, :width]
    return np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)[:height, :width]


def reduce_to_grid(mask: np.ndarray, cell: int) -> np.ndarray:
    """A full-resolution mask on the page's grid: a cell is masked if any of its pixels is."""
    return latent_mask(mask, cell)


def safe_stem(name: str) -> str:
    stem = Path(name or "picture").stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "picture"


class WebState:
    """Everything the app holds: pictures, masks, the job queue, results, the pipeline."""

    def __init__(
        self,
        workdir: Path,
        model: str = "tiny",
        pipe=None,
        pipe_factory=None,
        max_upload_bytes: int = int(DEFAULT_UPLOAD_MB * 1e6),
        adapter=None,
    ):
        self.workdir = Path(workdir)
        for sub in ("uploads", "results", "masks"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.model, self.adapter = model, adapter
        self.max_upload_bytes = max_upload_bytes
        self.images: dict[str, ImageEntry] = {}
        self.results: dict[str, ResultEntry] = {}
        self._pipe = pipe
        self._pipe_factory = pipe_factory
        self._pipe_error: str | None = None
        self._pipe_lock = threading.Lock()
        self._loaded: tuple[str, LoadedImage] | None = None  # the last picture decoded, kept for reuse
        self._loaded_lock = threading.Lock()
        self.queue = JobQueue(self._run_job)
        self._default_scheduler = pipe.scheduler if pipe is not None else None

    # ------------------------------------------------------------------ model

    @property
    def model_state(self) -> str:
        if self._pipe is not None:
            return "ready"
        return f"failed: {self._pipe_error}" if self._pipe_error else "loading"

    def pipe(self):
        """The pipeline, loaded on first use (or by `preload`)."""
        with self._pipe_lock:
            if self._pipe is None:
                try:
                    self._pipe = self._pipe_factory()
                except Exception as err:
                    self._pipe_error = f"{type(err).__name__}: {err}"
                    raise
                self._pipe_error = None
                self._default_scheduler = self._pipe.scheduler
            return self._pipe

    def preload(self) -> None:
        threading.Thread(target=lambda: _quietly(self.pipe), name="patch-adapter-load", daemon=True).start()

    @property
    def native_size(self) -> int:
        return native_size_for(self.model, self._pipe)

    @property
    def latent_factor(self) -> int:
        return latent_factor_for(self.model, self._pipe)

    # ------------------------------------------------------------------ pictures

    def image(self, image_id: str) -> ImageEntry:
        entry = self.images.get(image_id) if ID.match(image_id or "") else None
        if entry is None:
            raise NotFound(f"no picture {image_id!r} on this server (it may have been restarted); open it again")
        return entry

    def loaded(self, entry: ImageEntry) -> LoadedImage:
        with self._loaded_lock:
            if self._loaded is None or self._loaded[0] != entry.id:
                self._loaded = (entry.id, load_image(entry.path))
            return self._loaded[1]

    def add_image(self, path: Path, name: str) -> ImageEntry:
        loaded = load_image(path)  # the decompression-bomb guard refuses from the header
        width, height = loaded.size
        if max(width, height) > MAX_SIDE:
            raise ImageInputError(f"{name} is {width}x{height}; the web app opens pictures up to {MAX_SIDE} px a side")
        entry = ImageEntry(
            id=path.name,
            path=path,
            name=name,
            width=width,
            height=height,
            bit_depth=loaded.bit_depth,
            cell=cell_for(width, height),
        )
        entry.mask = np.zeros((height, width), dtype=bool)
        with self._loaded_lock:
            self._loaded = (entry.id, loaded)
        self.images[entry.id] = entry
        return entry

    def set_mask_bits(self, entry: ImageEntry, bits: bytes, version: int) -> None:
        grid_h, grid_w = entry.grid
        expected = -(-grid_h * grid_w // 8)
        if len(bits) != expected:
            raise ImageInputError(f"the mask has {len(bits)} bytes; a {grid_w}x{grid_h} mask packs into {expected}")
        grid = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=grid_h * grid_w).reshape(grid_h, grid_w)
        entry.mask = expand_grid(grid.astype(bool), entry.cell, entry.height, entry.width)
        entry.mask_version = version

    def set_mask_file(self, entry: ImageEntry, path: Path) -> bool:
        """Load a mask file (white = fill); True when it had to be grown to the page's grid."""
        mask = load_mask(path, self.loaded(entry))
        if not mask.any():
            raise ImageInputError(
                "this mask is empty (all black): nothing would be inpainted; white marks the area to fill"
            )
        grown = expand_grid(reduce_to_grid(mask, entry.cell), entry.cell, entry.height, entry.width)
        entry.mask = grown
        entry.mask_version += 1
        return not np.array_equal(grown, mask)

    def mask_bits(self, entry: ImageEntry) -> bytes:
        return np.packbits(reduce_to_grid(entry.mask, entry.cell)).tobytes()

    # ------------------------------------------------------------------ jobs

    def submit(self, entry: ImageEntry, settings_data: dict, mask_version: int) -> Job:
        if mask_version != entry.mask_version:
            raise ImageInputError(
                f"the server has mask version {entry.mask_version}, the page {mask_version}: "
                "the page has not finished sending its mask; run again"
            )
        settings = parse_settings(settings_data)
        check_settings(settings, self.native_size)
        plan = plan_for(settings, (entry.width, entry.height), entry.mask, self.native_size, self.latent_factor)
        if plan.empty_mask:
            raise ImageInputError("the mask is empty: paint the area to fill (or load a mask) before running")
        return self.queue.submit(entry.id, settings, plan, entry.mask.copy())  # later strokes leave it alone

    def _run_job(self, job: Job) -> str:
        entry = self.image(job.image_id)
        if self._pipe is None:
            job.state = "loading model"
        pipe = self.pipe()
        job.state, job.started = "running", time.monotonic()
        loaded = self.loaded(entry)
        s = job.settings
        pipe.progress_bar_class = progress_class(job)
        if s.scheduler:
            pipe.set_scheduler(s.scheduler)
        else:
            pipe.scheduler = self._default_scheduler
        try:
            result = pipe(image=loaded, mask_image=job.mask, **pipeline_kwargs(s))
        finally:
            del pipe.progress_bar_class  # back to the class attribute: plain tqdm
        seconds = time.monotonic() - job.started
        result_id = secrets.token_hex(8)
        path = self.workdir / "results" / f"{result_id}.png"
        settings = settings_dict(s)
        metadata = {
            **output_metadata(s, pipe, result),
            "model": self.model,
            "adapter": self.adapter,
            "source": entry.name,
        }
        save_image(path, result.arrays[0], metadata=metadata, icc_profile=loaded.icc_profile)
        self.results[result_id] = ResultEntry(
            id=result_id,
            image_id=entry.id,
            path=path,
            name=f"{safe_stem(entry.name)}_inpainted_{len(self.results) + 1}.png",
            settings=settings,
            bbox=mask_bbox(job.mask),
            unet_forwards=result.plan.unet_forwards,
            seconds=seconds,
        )
        return result_id

    def close(self) -> None:
        self.queue.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def check_settings(settings, native: int) -> None:
    """The settings' own checks, against this backbone, run before queueing (no model needed)."""
    from ..cli import settings_from_args

    settings_from_args(settings).resolved(native)


def _quietly(fn):
    try:
        fn()
    except Exception as err:
        print(f"patch-adapter serve: the model failed to load: {err}", file=sys.stderr)


# --------------------------------------------------------------------------- security


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values that name this server."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return {f"{name.lower()}:{port}" for name in names}


class LocalOnly:
    """ASGI middleware: refuse requests whose Host or Origin is not this server.

    A web page on another site can make the browser send requests to 127.0.0.1:PORT
    (cross-site) or, by DNS rebinding, to a name that resolves there; both carry a
    foreign Origin or Host, and get 403. A cross-site GET (an <img> on another site) carries
    no Origin, but its Sec-Fetch-Site says cross-site: 403 as well, except for a link to the page.
    """

    def __init__(self, app, hosts: set[str]):
        self.app = app
        self.hosts = hosts
        self.origins = {f"http://{h}" for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1").lower()
            origin = headers.get(b"origin")
            reason = None
            if host not in self.hosts:
                reason = f"Host {host!r} is not this server; open http://127.0.0.1:{_port_of(self.hosts)}/"
            elif origin is not None and origin.decode("latin-1").lower() not in self.origins:
                reason = f"cross-site request from Origin {origin.decode('latin-1')!r} refused"
            elif headers.get(b"sec-fetch-site") == b"cross-site" and headers.get(b"sec-fetch-mode") != b"navigate":
                reason = "cross-site request refused (a link to the page itself is fine)"  # e.g. <img src> elsewhere
            if reason:
                if scope["type"] == "http":
                    await JSONResponse({"error": reason}, status_code=403)(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def _port_of(hosts: set[str]) -> str:
    return next(iter(hosts)).rsplit(":", 1)[1]


async def receive_upload(request: Request, path: Path, cap: int) -> int:
    """Stream the body into `path`, refusing as soon as it passes `cap` bytes.

    Written through `atomic_write` (no fsync: the folder is temporary), so `path` never
    holds half an upload.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise UploadTooLarge(
            f"the upload is {int(declared) / 1e6:.1f} MB, more than the limit of {cap / 1e6:.0f} MB "
            "(start the server with --max-upload-mb to change it)"
        )
    size = 0
    with atomic_write(path, durable=False) as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise UploadTooLarge(
                    f"the upload passed the limit of {cap / 1e6:.0f} MB "
                    "(start the server with --max-upload-mb to change it)"
                )
            f.write(chunk)
    if size == 0:
        path.unlink(missing_ok=True)
        raise ImageInputError("the upload is empty; choose a picture file")
    return size


# --------------------------------------------------------------------------- the app


def create_app(state: WebState, host: str = "127.0.0.1", port: int = 7860) -> Starlette:
    """The ASGI app over `state`; `host`/`port` decide which Host headers it answers."""

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def config(request):
        return JSONResponse(
            {
                "version": __version__,
                "model": state.model,
                "model_state": state.model_state,
                "native_size": state.native_size,
                "settings": settings_schema(),
                "methods": list(METHODS),
                "max_upload_bytes": state.max_upload_bytes,
                "max_side": MAX_SIDE,
            }
        )

    async def upload_image(request):
        name = unquote(request.headers.get("x-filename", "")) or "the picture"
        path = state.workdir / "uploads" / secrets.token_hex(8)
        await receive_upload(request, path, state.max_upload_bytes)
        try:
            with named(path, name):
                entry = await run_in_threadpool(state.add_image, path, name)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return JSONResponse(entry.to_json())

    async def put_mask(request):
        entry = state.image(request.path_params["image_id"])
        version = request.headers.get("x-mask-version", "")
        if not version.isdigit():
            raise ImageInputError("the mask needs an X-Mask-Version header (an integer)")
        grid_h, grid_w = entry.grid
        bits = b"".join([chunk async for chunk in _capped(request, grid_h * grid_w // 8 + 2)])
        await run_in_threadpool(state.set_mask_bits, entry, bits, int(version))
        return JSONResponse({"version": entry.mask_version, "pixels": int(entry.mask.sum())})

    async def mask_file(request):
        entry = state.image(request.path_params["image_id"])
        path = state.workdir / "masks" / secrets.token_hex(8)
        await receive_upload(request, path, state.max_upload_bytes)
        try:
            with named(path, "the mask file"), named(entry.path, entry.name):
                grown = await run_in_threadpool(state.set_mask_file, entry, path)
        finally:
            path.unlink(missing_ok=True)
        note = (
            f"the mask was grown to the page's {entry.cell}x{entry.cell} px grid for a picture this large"
            if grown
            else None
        )
        return JSONResponse({"version": entry.mask_version, "pixels": int(entry.mask.sum()), "note": note})

    async def get_mask_bits(request):
        entry = state.image(request.path_params["image_id"])
        bits = await run_in_threadpool(state.mask_bits, entry)
        return Response(
            bits, media_type="application/octet-stream", headers={"X-Mask-Version": str(entry.mask_version)}
        )

    async def get_mask_png(request):
        entry = state.image(request.path_params["image_id"])
        path = state.workdir / "masks" / f"{entry.id}.png"
        pixels = np.repeat((entry.mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
        await run_in_threadpool(save_image, path, pixels)
        return FileResponse(path, media_type="image/png", filename=f"{safe_stem(entry.name)}_mask.png")

    async def display_png(request):
        """The picture as an 8-bit PNG, for formats the browser cannot decode (TIFF)."""
        entry = state.image(request.path_params["image_id"])
        path = state.workdir / "uploads" / f"{entry.id}.display.png"
        if not path.exists():
            pixels = state.loaded(entry).pixels
            if pixels.dtype != np.uint8:
                pixels = from_float(to_float(pixels), np.uint8)
            await run_in_threadpool(save_image, path, pixels)
        return FileResponse(path, media_type="image/png")

    async def plan(request):
        body = await _json(request)
        entry = state.image(body.get("image_id"))
        settings = parse_settings(body.get("settings", {}))
        check_settings(settings, state.native_size)
        size = (entry.width, entry.height)
        result = await run_in_threadpool(plan_for, settings, size, entry.mask, state.native_size, state.latent_factor)
        return JSONResponse({**plan_json(result), "mask_version": entry.mask_version})

    async def submit(request):
        body = await _json(request)
        entry = state.image(body.get("image_id"))
        version = body.get("mask_version")
        if not isinstance(version, int):
            raise ImageInputError("mask_version must be an integer")
        job = await run_in_threadpool(state.submit, entry, body.get("settings", {}), version)
        return JSONResponse(job.to_json())

    async def jobs(request):
        return JSONResponse({"jobs": state.queue.listing(), "model_state": state.model_state})

    async def job(request):
        found = state.queue.jobs.get(request.path_params["job_id"])
        if found is None:
            raise NotFound("no such job")
        return JSONResponse(found.to_json())

    async def cancel(request):
        found = state.queue.cancel(request.path_params["job_id"])
        if found is None:
            raise NotFound("no such job")
        return JSONResponse(found.to_json())

    async def results(request):
        return JSONResponse({"results": [r.to_json() for r in state.results.values()]})

    async def result_png(request):
        entry = state.results.get(request.path_params["result_id"])
        if entry is None:
            raise NotFound("no such result (results live until the server stops)")
        return FileResponse(entry.path, media_type="image/png", filename=entry.name)

    def error(status):
        async def handler(request, exc):
            return JSONResponse({"error": str(exc)}, status_code=status)

        return handler

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/images", upload_image, methods=["POST"]),
        Route("/api/images/{image_id}/mask", put_mask, methods=["PUT"]),
        Route("/api/images/{image_id}/mask-file", mask_file, methods=["POST"]),
        Route("/api/images/{image_id}/mask.bits", get_mask_bits),
        Route("/api/images/{image_id}/mask.png", get_mask_png),
        Route("/api/images/{image_id}/display.png", display_png),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/results", results),
        Route("/api/results/{result_id}.png", result_png),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    handlers = {UploadTooLarge: error(413), NotFound: error(404), SettingsError: error(400), ValueError: error(400)}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    return LocalOnly(app, allowed_hosts(host, port))


@contextmanager
def named(path: Path, name: str):
    """Messages about an upload name the user's file, not the server's temporary path."""
    try:
        yield
    except ImageInputError as err:
        raise type(err)(str(err).replace(str(path), name)) from None


async def _json(request: Request) -> dict:
    try:
        body = json.loads(b"".join([chunk async for chunk in _capped(request, 1 << 20)]) or b"{}")
    except json.JSONDecodeError as err:
        raise ImageInputError(f"the request body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ImageInputError("the request body must be a JSON object")
    return body


async def _capped(request: Request, cap: int):
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise UploadTooLarge(f"the request body passed {cap} bytes")
        yield chunk


def serve(args) -> int:
    """`patch-adapter serve`: run until Ctrl-C, then remove the temporary folder."""
    import uvicorn

    from ..backbone import resolve_device

    def load():
        from ..pipeline import PatchAdapterPipeline

        device = resolve_device(args.device)
        dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
        pipe = PatchAdapterPipeline.from_pretrained(
            args.model,
            adapter=args.adapter,
            device=str(device),
            dtype=dtype,
            config=args.config,
            cpu_offload=args.cpu_offload,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def stop(signum, frame):  # uvicorn re-raises SIGTERM after its graceful shutdown: exit through `finally`
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    with tempfile.TemporaryDirectory(prefix="patch-adapter-web-") as workdir:
        state = WebState(
            Path(workdir),
            model=args.model,
            pipe_factory=load,
            adapter=args.adapter,
            max_upload_bytes=int(args.max_upload_mb * 1e6),
        )
        state.preload()
        app = create_app(state, host=args.host, port=args.port)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"Patch-Adapter web app on http://{shown}:{args.port}/ (model {args.model}; Ctrl-C stops it)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"note: --host {args.host} lets other machines reach the app, without authentication; it answers "
                f"only requests addressed to http://{shown}:{args.port}/ or to this machine's loopback",
                file=sys.stderr,
            )
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
        except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn once it has shut down
            pass
        finally:
            state.close()
        print("stopped; the temporary folder was removed", flush=True)
    return 0
