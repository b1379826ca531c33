"""Loading and saving `PatchAdapterPipeline` the way diffusers users do.

`PatchAdapterLoadingMixin` gives the pipeline diffusers' loading contract:

- `from_pretrained` takes diffusers' keywords (torch_dtype incl. a dict per component,
  variant, use_safetensors, revision, cache_dir, local_files_only, low_cpu_mem_usage,
  device_map, token, component overrides such as ``unet=``, a scheduler object) and
  hands folders and hub ids to diffusers' own `DiffusionPipeline.from_pretrained`, so
  nothing of it is reimplemented; it adds ``adapter=``, ``device=``, ``cpu_offload=``,
  ``scheduler="euler"`` (a short name), ``config=`` (single files) and ``dtype=``;
- `save_pretrained` writes the backbone as a diffusers folder and the adapters beside
  it as ``patch_adapter.safetensors``, so a round trip gives identical outputs;
- `from_pipe` works both ways, sharing components.

A saved folder's ``model_index.json`` names the stock ``StableDiffusionXLInpaintPipeline``:
`DiffusionPipeline.from_pretrained(folder)` and `AutoPipelineForInpainting.from_pretrained(folder)`
load the *backbone without the adapters* (they do not read ``patch_adapter.safetensors``);
`PatchAdapterPipeline.from_pretrained(folder)` loads both. diffusers' other route, a
custom pipeline (``_class_name`` as ``[module, class]`` plus a ``.py`` in the folder), is
refused by AutoPipeline, which maps class-name strings only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .adapters import BUNDLED_ADAPTER_FILE, load_adapter, save_adapter
from .adapters.dual_context import DualContextAttnProcessor
from .adapters.reference_patch import ReferencePatchAttnProcessor
from .backbone import (
    BackboneLoadError,
    _offline_hint,
    check_inpainting_backbone,
    resolve_device,
    resolve_dtype,
    source_kind,
    tiny_weights_dir,
)
from .settings import SCHEDULERS

STOCK_CLASS_NAME = "StableDiffusionXLInpaintPipeline"
"""The `_class_name` a saved folder gets: what diffusers' generic loaders can build from it."""

OUR_KEYWORDS = ("adapter", "device", "cpu_offload", "scheduler", "config", "dtype", "torch_dtype")
REFUSED_KEYWORDS = ("custom_pipeline", "custom_revision", "load_connected_pipeline")
"""diffusers keywords that would build another pipeline class than this one."""


def bundled_adapter(source) -> Path | None:
    """The adapter file a backbone folder ships, if any."""
    folder = tiny_weights_dir() if str(source) == "tiny" else Path(str(source)).expanduser()
    path = folder / BUNDLED_ADAPTER_FILE
    return path if path.is_file() else None


#: The keywords diffusers 0.42's loaders take from their **kwargs (DiffusionPipeline.from_pretrained
#: with download, and from_single_file). Another keyword is refused rather than ignored: diffusers
#: itself only logs unknown ones. A newer diffusers keyword is one line here.
PRETRAINED_KEYWORDS = frozenset({
    "cache_dir", "device_map", "disable_mmap", "force_download", "local_files_only", "low_cpu_mem_usage",
    "max_memory", "offload_folder", "offload_state_dict", "provider", "provider_options", "proxies",
    "quantization_config", "revision", "sess_options", "token", "trust_remote_code", "use_flashpack", "use_onnx",
    "use_safetensors", "variant",
})  # fmt: skip
SINGLE_FILE_KEYWORDS = frozenset({
    "cache_dir", "config", "disable_mmap", "force_download", "load_safety_checker", "local_files_only",
    "original_config", "original_config_file", "proxies", "revision", "token",
})  # fmt: skip


def check_keywords(cls, kwargs: dict, loader_keywords: frozenset, method: str = "from_pretrained") -> None:
    """Refuse keywords neither the diffusers loader nor the pipeline's __init__ takes (diffusers only logs them)."""
    refused = sorted(set(kwargs) & set(REFUSED_KEYWORDS))
    if refused:
        raise TypeError(
            f"{cls.__name__}.{method} does not take {', '.join(refused)}: it always builds "
            f"{cls.__name__} (use DiffusionPipeline.from_pretrained for other pipelines)"
        )
    expected, optional = cls._get_signature_keys(cls)
    known = set(expected) | set(optional) | set(OUR_KEYWORDS) | loader_keywords
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{cls.__name__}.{method} got unexpected keyword arguments: {', '.join(unknown)}")


def resolve_dtypes(dtype, torch_dtype):
    """`dtype` or its alias `torch_dtype`: a torch dtype or a name ("fp16"), or a dict per component
    (with an optional "default"); float32 when neither is given."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one of them")
    value = torch_dtype if torch_dtype is not None else dtype
    if isinstance(value, dict):
        return {name: resolve_dtype(item) for name, item in value.items()}
    return resolve_dtype(value)


def our_keywords(kwargs: dict):
    """Pop (adapter, device, cpu_offload, scheduler name, dtype) from `kwargs`; a scheduler object
    stays in them, as diffusers' component override."""
    adapter = kwargs.pop("adapter", None)
    device = kwargs.pop("device", "auto")
    cpu_offload = kwargs.pop("cpu_offload", False)
    scheduler = kwargs.get("scheduler")
    if isinstance(scheduler, str) or scheduler is None:
        kwargs.pop("scheduler", None)
    else:
        scheduler = None
    dtype = resolve_dtypes(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
    return adapter, device, cpu_offload, scheduler, dtype


PLAIN_PROCESSORS = (
    "AttnProcessor",
    "AttnProcessor2_0",
    "XFormersAttnProcessor",
    "SlicedAttnProcessor",
    "AttnProcessorNPU",
    "FusedAttnProcessor2_0",
)
"""diffusers' processors that compute plain attention: ours compute the same, nothing is lost."""


def own_processors(unet) -> dict:
    """{name: processor} of a UNet's processors that do more than plain attention and are not ours
    (an IP-Adapter's, a LoRA-era custom one): installing the adapters must not drop them unnoticed."""
    return {
        name: proc
        for name, proc in unet.attn_processors.items()
        if type(proc).__name__ not in PLAIN_PROCESSORS
        and not isinstance(proc, (DualContextAttnProcessor, ReferencePatchAttnProcessor))
    }


def still_present(proc, unet) -> bool:
    """Whether `proc` is still in the UNet, installed or composed into an installed processor."""
    for current in unet.attn_processors.values():
        if current is proc:
            return True
        if isinstance(current, torch.nn.Module) and any(m is proc for m in current.modules()):
            return True
        if any(value is proc for value in getattr(current, "__dict__", {}).values()):
            return True
    return False


def warn_replaced(before: dict, unet, where: str) -> None:
    lost = {name: proc for name, proc in before.items() if not still_present(proc, unet)}
    if lost:
        kinds = sorted({type(p).__name__ for p in lost.values()})
        warnings.warn(
            f"{where}: the UNet came with its own attention processors ({', '.join(kinds)} on "
            f"{len(lost)} layers), which installing the Patch-Adapter processors replaced; "
            "load them (e.g. load_ip_adapter) after building the pipeline",
            UserWarning,
            stacklevel=3,
        )


WEIGHT_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def align_weights(pipe) -> None:
    """Copy CPU weights that a memory-mapped file left off the 64-byte alignment.

    safetensors maps files into memory, so a small tensor can start anywhere; the CPU
    matmul kernels then take another path and round differently (a 32x32 projection: 2e-7),
    and the same weights loaded from two folders gave results one uint8 level apart. Aligned,
    a saved and reloaded pipeline computes bit for bit what the original did.
    """
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % WEIGHT_ALIGNMENT:
                tensor.data = tensor.data.clone()


def hub_adapter(repo_id: str, revision=None, cache_dir=None, token=None, local_files_only=None) -> Path | None:
    """The repo's `patch_adapter.safetensors` (downloaded or from the cache), or None with a warning
    that says why the adapters stay at their initial weights."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import OfflineModeIsEnabled

    cached = try_to_load_from_cache(repo_id, BUNDLED_ADAPTER_FILE, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    absent = cached is not None  # the cache remembers that the repo has no such file
    if not absent:
        try:
            return Path(
                hf_hub_download(
                    repo_id,
                    BUNDLED_ADAPTER_FILE,
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    local_files_only=bool(local_files_only),
                )
            )
        except EntryNotFoundError:
            absent = True
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
            warnings.warn(
                f"could not check {repo_id} for {BUNDLED_ADAPTER_FILE} (offline, and not in the cache: "
                f"{type(err).__name__}); the adapters are at their initial weights. Pass adapter=PATH (CLI: "
                f"--adapter PATH), download it with `hf download {repo_id} {BUNDLED_ADAPTER_FILE}`, or pass "
                "adapter=False to say you want none.",
                UserWarning,
                stacklevel=3,
            )
            return None
    if absent:
        warnings.warn(
            f"{repo_id} ships no {BUNDLED_ADAPTER_FILE}: the adapters are at their initial weights "
            "(pass adapter=PATH for trained ones, or adapter=False to say you want none)",
            UserWarning,
            stacklevel=3,
        )
    return None


class PatchAdapterLoadingMixin:
    """diffusers' loading contract for `PatchAdapterPipeline`, plus its adapter file."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if issubclass(cls, DiffusionPipeline):
            register_for_auto_pipelines(cls)

    @classmethod
    def _get_signature_types(cls):
        """The stock pipeline's component types where our __init__ has no annotation: diffusers'
        from_pipe only hands over models whose type matches them."""
        from diffusers import StableDiffusionXLInpaintPipeline

        types = super()._get_signature_types()
        stock = StableDiffusionXLInpaintPipeline._get_signature_types()
        empty = (inspect.Signature.empty,)
        return {name: stock.get(name, kinds) if kinds == empty else kinds for name, kinds in types.items()}

    # ------------------------------------------------------------------ from_pretrained

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path="tiny", **kwargs):
        """Load the backbone (``"tiny"``, a diffusers folder, a single file or a hub id) and the adapters.

        Takes diffusers' `DiffusionPipeline.from_pretrained` keywords (folders and hub ids
        are loaded by it; single files by `from_single_file`), and:

        - adapter: a Patch-Adapter ``.safetensors`` file. Default: the one a folder ships
          beside ``model_index.json`` (``patch_adapter.safetensors``, as "tiny" does), or a hub
          repo's file of that name (a warning when there is none, or offline when it is not
          cached). **adapter=False loads none: the adapters stay at their initial weights**,
          where DCA has no effect and RPA is plain reference-only attention. adapter=True:
          the shipped file, and an error when there is none.
        - device: "auto" (cuda, mps, cpu) or a torch device; not moved with device_map.
        - cpu_offload: diffusers' model CPU offload on that device (needs accelerate and a GPU).
        - scheduler: a short name (euler, euler-a, ddim, dpm++, unipc) or a scheduler object.
        - dtype / torch_dtype: a torch dtype, "fp32"/"fp16"/"bf16", or a dict per component
          (``{"unet": torch.float16, "default": torch.float32}``); float32 by default.
        - config: for a single-file checkpoint, a diffusers folder or hub id with its configs.

        Unknown keywords raise TypeError (diffusers itself would only log them).
        """
        source = str(pretrained_model_name_or_path)
        kind, resolved = source_kind(source)
        if kind == "single_file":
            return cls.from_single_file(str(resolved), **kwargs)
        kwargs = dict(kwargs)
        adapter, device, cpu_offload, scheduler, dtype = our_keywords(kwargs)
        if kwargs.pop("config", None) is not None:
            raise TypeError("config= is for single-file checkpoints; a diffusers folder or hub id has its own")
        check_keywords(cls, kwargs, PRETRAINED_KEYWORDS)
        if device_map_conflict(kwargs, device, cpu_offload):
            raise ValueError("device_map places the models itself: leave device='auto' and cpu_offload=False")
        before = own_processors(kwargs["unet"]) if kwargs.get("unet") is not None else {}

        if kind == "folder":
            try:
                pipe = super().from_pretrained(resolved, dtype=dtype, **kwargs)
            except OSError as err:
                raise BackboneLoadError(f"could not load the diffusers folder {source}: {err}") from err
        else:  # hub id
            try:
                pipe = super().from_pretrained(resolved, dtype=dtype, **kwargs)
            except Exception as err:  # connection errors, missing cache entries, 404s
                raise BackboneLoadError(
                    _offline_hint(source) + f"\n(underlying error: {type(err).__name__}: {err})"
                ) from err
        check_inpainting_backbone({"unet": pipe.unet, "vae": pipe.vae}, source)
        if before:
            warn_replaced(before, pipe.unet, f"{cls.__name__}.from_pretrained(unet=...)")
        if adapter is None or adapter is True:
            if kind == "hub":
                found = hub_adapter(
                    resolved,
                    kwargs.get("revision"),
                    kwargs.get("cache_dir"),
                    kwargs.get("token"),
                    kwargs.get("local_files_only"),
                )
            else:
                found = bundled_adapter(resolved)
            if adapter is True and found is None:
                raise BackboneLoadError(f"adapter=True, but {source} ships no {BUNDLED_ADAPTER_FILE}")
            adapter = found
        return pipe._finish_loading(
            source, adapter, scheduler, device, cpu_offload, placed=kwargs.get("device_map") is not None
        )

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """A single-file SDXL-inpainting checkpoint through diffusers' `from_single_file`, with the
        adapters installed; ``adapter=`` loads a file (none by default: a checkpoint ships none).

        Takes `from_pretrained`'s own keywords (device, cpu_offload, scheduler, dtype) too;
        offline, ``config=`` must be a local diffusers folder with the component configs.
        """
        source = str(pretrained_model_link_or_path)
        kwargs = dict(kwargs)
        adapter, device, cpu_offload, scheduler, dtype = our_keywords(kwargs)
        if isinstance(dtype, dict):
            raise TypeError("a single-file checkpoint loads with one dtype, not a dict per component")

        check_keywords(cls, kwargs, SINGLE_FILE_KEYWORDS, "from_single_file")
        if adapter is True:
            raise BackboneLoadError("adapter=True: a single-file checkpoint ships no adapter file; pass adapter=PATH")
        path = Path(source).expanduser()
        if "://" not in source and not path.is_file():
            raise BackboneLoadError(f"checkpoint file {source} does not exist.")
        if kwargs.get("local_files_only") is None:
            kwargs.pop("local_files_only", None)
        before = own_processors(kwargs["unet"]) if kwargs.get("unet") is not None else {}
        try:
            pipe = super().from_single_file(source, dtype=dtype, **kwargs)
        except Exception as err:  # diffusers raises many kinds here; all mean the same to the user
            raise BackboneLoadError(
                f"could not load the single-file checkpoint {source}: {err}\n"
                "A single-file checkpoint needs the SDXL-inpainting component configs. Offline, pass a local "
                "diffusers folder of diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (its *.json files are "
                "enough) as config= (CLI: --config DIR)."
            ) from err
        check_inpainting_backbone({"unet": pipe.unet, "vae": pipe.vae}, source)
        if before:
            warn_replaced(before, pipe.unet, f"{cls.__name__}.from_single_file(unet=...)")
        return pipe._finish_loading(source, adapter or None, scheduler, device, cpu_offload, placed=False)

    def _finish_loading(self, source: str, adapter, scheduler, device, cpu_offload: bool, placed: bool):
        self.backbone_name = source
        if scheduler:
            self.set_scheduler(scheduler)
        if adapter:
            self.load_adapter(adapter)
        if not placed:
            device = resolve_device(device)
            if cpu_offload and device.type != "cpu":
                self.enable_model_cpu_offload(device=device)
            else:
                self.to(device)
        align_weights(self)
        return self

    # ------------------------------------------------------------------ from_pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """This pipeline from another one's components, shared, not copied (diffusers' `from_pipe`).

        The adapters are installed in the shared UNet: at their initial weights, unless it
        already holds them (e.g. `pipeline` was made from a PatchAdapterPipeline) or
        ``adapter=PATH`` is given. ``scheduler=`` may be a short name. The dtype stays the
        source pipeline's unless ``torch_dtype`` says otherwise (diffusers would cast to fp32).
        Stock pipelines made from this one (`StableDiffusionXLInpaintPipeline.from_pipe`,
        `AutoPipelineForInpainting.from_pipe`) share its UNet with the adapters installed;
        without the adapters' call arguments these compute exactly what stock attention does.
        """
        kwargs = dict(kwargs)
        adapter = kwargs.pop("adapter", None)
        scheduler = kwargs.get("scheduler")
        if isinstance(scheduler, str):
            kwargs.pop("scheduler")
        else:
            scheduler = None
        dtype = kwargs.pop("dtype", None)
        dtype = resolve_dtype(kwargs.pop("torch_dtype", None) or dtype or pipeline.dtype)
        unet = kwargs.get("unet", getattr(pipeline, "unet", None))
        before = own_processors(unet) if unet is not None else {}
        pipe = super().from_pipe(pipeline, dtype=dtype, **kwargs)
        if before:
            warn_replaced(before, pipe.unet, f"{cls.__name__}.from_pipe")
        if scheduler:
            pipe.set_scheduler(scheduler)
        if adapter:
            pipe.load_adapter(adapter)
        align_weights(pipe)
        return pipe

    # ------------------------------------------------------------------ saving

    @contextlib.contextmanager
    def stock_attention(self):
        """Within this block the UNet has diffusers' stock processors where the adapters were
        (a loaded IP-Adapter keeps its own, see `AdapterGuardMixin.stock_processors`)."""
        installed = self.unet.attn_processors
        self.unet.set_attn_processor(self.stock_processors())
        try:
            yield self.unet
        finally:
            self.unet.set_attn_processor(installed)

    def save_pretrained(self, save_directory, **kwargs):
        """The backbone as a diffusers folder, the adapters beside it as ``patch_adapter.safetensors``.

        `from_pretrained(save_directory)` gives this pipeline back, adapters included. The
        folder's ``model_index.json`` names ``StableDiffusionXLInpaintPipeline``, so diffusers'
        generic loaders (`DiffusionPipeline`, `AutoPipelineForInpainting`) load the backbone
        from it, without the adapters. With push_to_hub the adapter file is uploaded too.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_adapter(folder / BUNDLED_ADAPTER_FILE)  # first: diffusers pushes at the end of its save
        with self.stock_attention():
            super().save_pretrained(save_directory, **kwargs)

    def save_config(self, save_directory, *args, **kwargs):
        """diffusers' model_index.json, naming the stock class that can load the folder (see save_pretrained)."""
        super().save_config(save_directory, *args, **kwargs)
        index = Path(save_directory) / self.config_name
        config = json.loads(index.read_text())
        config["_class_name"] = STOCK_CLASS_NAME
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ adapters and scheduler

    def load_adapter(self, path) -> dict:
        """Load Patch-Adapter weights (DCA, RPA or both); returns the file's manifest."""
        return load_adapter(path, self.unet)

    def save_adapter(self, path, kinds=("dca", "rpa")):
        """Write the adapters' weights (with a manifest naming the backbone) to a .safetensors file."""
        return save_adapter(path, self.unet, kinds, backbone_name=self.backbone_name)

    def set_scheduler(self, name: str) -> None:
        """Swap the scheduler by short name (euler, euler-a, ddim, dpm++, unipc)."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
        self.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(self.scheduler.config)


def device_map_conflict(kwargs: dict, device, cpu_offload: bool) -> bool:
    return kwargs.get("device_map") is not None and (str(device) != "auto" or cpu_offload)


def register_for_auto_pipelines(pipeline_class) -> None:
    """Let AutoPipeline*.from_pipe(pa_pipe) find the SDXL pipelines for a PatchAdapterPipeline.

    AutoPipeline finds a pipeline's family by its class name in its task tables; an extra
    table that names only this class adds the lookup without changing any existing one.
    """
    try:
        from diffusers.pipelines import auto_pipeline
    except ImportError:
        return
    tables = getattr(auto_pipeline, "SUPPORTED_TASKS_MAPPINGS", None)
    if isinstance(tables, list) and not any(pipeline_class in t.values() for t in tables):
        from collections import OrderedDict

        tables.append(OrderedDict([("stable-diffusion-xl", pipeline_class)]))
