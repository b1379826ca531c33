"""Settings, plans and the one-at-a-time job queue of the web app.

Settings are parsed by the CLI's own `inpaint` parser, so the page has the CLI's
names, types, choices and defaults and cannot drift from them. Plans come from
`planning.make_plan`, runs from `PatchAdapterPipeline.__call__`; this module only
moves values between them and the page.
"""

from __future__ import annotations

import argparse
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..cli import add_inpaint_parser, latent_factor_of, native_size_of, plan_from_args
from ..planning import InpaintPlan
from ..validation import LATENT_FACTOR, SettingsError

# the inpaint flags the page offers: main settings first, then the advanced panel
MAIN_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "method")
ADVANCED_SETTINGS = (
    "scheduler",
    "refine_steps",
    "strength",
    "refine_strength",
    "dca_scale",
    "rpa_scale",
    "tile_size",
    "tile_overlap",
    "mask_dilation",
    "mask_feather",
    "crop_margin",
    "patch_batch_size",
)
SETTINGS = MAIN_SETTINGS + ADVANCED_SETTINGS


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit the server
        raise SettingsError(message)


def inpaint_parser() -> argparse.ArgumentParser:
    """The CLI's `inpaint` parser, raising instead of exiting."""
    root = _RaisingParser(prog="patch-adapter")
    subparsers = root.add_subparsers(parser_class=_RaisingParser)
    add_inpaint_parser(subparsers)
    return subparsers.choices["inpaint"]


def settings_schema() -> list[dict]:
    """Name, default, type, choices and help of each setting, for the page's form."""
    actions = {a.dest: a for a in inpaint_parser()._actions}
    schema = []
    for name in SETTINGS:
        action = actions[name]
        kind = {int: "int", float: "float"}.get(action.type, "str")
        schema.append(
            {
                "name": name,
                "default": action.default,
                "type": kind,
                "choices": action.choices,
                "help": action.help,
                "advanced": name in ADVANCED_SETTINGS,
            }
        )
    return schema


def parse_settings(data: dict) -> argparse.Namespace:
    """Page settings -> the namespace `patch-adapter inpaint` would build from the same flags."""
    if not isinstance(data, dict):
        raise SettingsError("settings must be a JSON object")
    argv = ["IMAGE"]
    for name, value in data.items():
        if name not in SETTINGS:
            raise SettingsError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        if value is None or (value == "" and name not in ("prompt",)):
            continue  # the CLI's default
        if isinstance(value, (dict, list)):
            raise SettingsError(f"setting {name!r} must be a number or a string")
        argv.append(f"--{name.replace('_', '-')}={value}")
    return inpaint_parser().parse_args(argv)


def settings_dict(settings: argparse.Namespace) -> dict:
    """The page's settings out of a parsed namespace (for history and job listings)."""
    return {name: getattr(settings, name) for name in SETTINGS}


def plan_for(
    settings: argparse.Namespace,
    size: tuple[int, int],
    mask: np.ndarray,
    native: int,
    latent_factor: int = LATENT_FACTOR,
) -> InpaintPlan:
    """The plan the pipeline will follow for these settings, made without the model (the CLI's --plan mapping)."""
    return plan_from_args(settings, size, mask, native, latent_factor)


def plan_json(plan: InpaintPlan) -> dict:
    """The plan in pixels, for drawing over the picture."""
    px = plan.latent_factor
    groups = [
        [{"top": t.top * px, "left": t.left * px, "width": t.width * px, "height": t.height * px} for t in group]
        for group in plan.groups
    ]
    return {
        "method": plan.method,
        "empty_mask": plan.empty_mask,
        "stage1_size": plan.stage1_size,
        "stage1_box": plan.stage1_box,
        "stage1_steps": plan.stage1_steps,
        "stage2_steps": plan.stage2_steps,
        "groups": groups,
        "patches": len(plan.tiles),
        "reference_passes": plan.reference_passes,
        "unet_forwards": plan.unet_forwards,
        "unet_evaluations": plan.unet_evaluations,
        "describe": plan.describe(),
    }


def native_size_for(model: str, pipe=None) -> int:
    return pipe.native_size if pipe is not None else native_size_of(model)


def latent_factor_for(model: str, pipe=None) -> int:
    """Pixels per latent of the model's VAE: the loaded pipeline's, else read from its folder (`native_size_for`'s twin)."""
    return pipe.vae_scale_factor if pipe is not None else latent_factor_of(model)


# --------------------------------------------------------------------------- jobs


class JobCancelled(Exception):
    """Raised from a progress bar to stop the pipeline between two UNet calls."""


@dataclass
class Job:
    id: str
    image_id: str
    settings: argparse.Namespace
    plan: InpaintPlan
    state: str = "queued"  # queued, loading model, running, done, failed, cancelled
    stage: str = ""
    group: int = 0  # stage-2 patch group, 1-based
    step: str = ""
    done_units: int = 0
    total_units: int = 1
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result_id: str | None = None
    mask: np.ndarray | None = None  # the mask it runs, fixed when queued
    cancel: threading.Event = field(default_factory=threading.Event)

    def eta(self) -> float | None:
        if self.started is None or self.done_units == 0 or self.state != "running":
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.done_units * max(0, self.total_units - self.done_units)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "image_id": self.image_id,
            "state": self.state,
            "stage": self.stage,
            "group": self.group,
            "groups": len(self.plan.groups),
            "step": self.step,
            "progress": min(1.0, self.done_units / max(1, self.total_units)),
            "eta_s": self.eta(),
            "error": self.error,
            "result_id": self.result_id,
            "settings": settings_dict(self.settings),
        }


def work_units(plan: InpaintPlan) -> int:
    """Ticks the pipeline's progress bars will make: stage-1 steps, reference patches, patch steps."""
    reference = len(plan.tiles) if plan.reference_passes else 0  # the reference bar counts patches
    return plan.stage1_steps + reference + len(plan.tiles) * plan.stage2_steps


def progress_class(job: Job):
    """A tqdm subclass that reports each tick into `job` and raises JobCancelled when asked.

    The pipeline ticks once per stage-1 step, per reference batch and per stage-2 patch
    batch, so a cancel stops the run within one step.
    """

    class JobProgress(tqdm):
        def __init__(self, iterable=None, *args, desc="", **kwargs):
            kwargs["disable"] = True  # the server's terminal is no place for bars
            super().__init__(iterable, *args, desc=desc, **kwargs)
            self._desc = desc
            if desc.startswith("stage 1"):
                job.stage = f"whole image, {desc[len('stage 1 ') :].strip('()')}"
            elif desc.startswith("reference"):
                job.group += 1
                job.stage = "reference patches"
            elif desc.startswith("stage 2"):
                if not job.plan.reference_passes:
                    job.group += 1
                job.stage = f"patches ({desc[len('stage 2 ') :].strip('()')})"
            job.step = ""
            self._check()

        def _check(self):
            if job.cancel.is_set():
                raise JobCancelled()

        def _tick(self, units):
            job.done_units += units
            self._check()

        def __iter__(self):
            total = len(self.iterable) if hasattr(self.iterable, "__len__") else None
            for index, item in enumerate(self.iterable):
                self._check()
                if self._desc.startswith("stage 1") and total:
                    job.step = f"step {index + 1}/{total}"
                yield item
                self._tick(1)

        def update(self, n=1):  # stage 2: n patches took one step
            self._tick(n)

        def set_postfix_str(self, s="", refresh=True):
            job.step = s

    return JobProgress


class JobQueue:
    """One worker thread runs jobs in order; `runner(job)` does the work and returns a result id."""

    def __init__(self, runner):
        self._runner = runner
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._thread = threading.Thread(target=self._work, name="patch-adapter-jobs", daemon=True)
        self._thread.start()

    def submit(self, image_id, settings, plan, mask) -> Job:
        job = Job(
            id=secrets.token_hex(8),
            image_id=image_id,
            settings=settings,
            plan=plan,
            mask=mask,
            total_units=max(1, work_units(plan)),
        )
        with self._lock:
            self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None and job.state in ("queued", "loading model", "running"):
            job.cancel.set()
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.monotonic()
        return job

    def listing(self) -> list[dict]:
        with self._lock:
            return [job.to_json() for job in self.jobs.values()]

    def stop(self, timeout: float = 5.0) -> None:
        for job in list(self.jobs.values()):
            job.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            try:
                job.result_id = self._runner(job)
                job.state = "done"
            except JobCancelled:
                job.state = "cancelled"
            except Exception as err:  # the page shows it; the server keeps serving
                job.state, job.error = "failed", f"{type(err).__name__}: {err}"
            job.finished = time.monotonic()
