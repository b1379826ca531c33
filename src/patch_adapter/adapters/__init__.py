"""The two adapters beside the frozen UNet, as diffusers attention processors."""

from .dual_context import DualContextAttnProcessor, token_mask
from .guard import AdapterGuardMixin, AdapterReplacedError
from .reference_patch import ReferenceBank, ReferencePatchAttnProcessor
from .weights import (
    ADAPTER_KINDS,
    BUNDLED_ADAPTER_FILE,
    AdapterLoadError,
    adapter_parameters,
    adapter_processors,
    adapter_state_dict,
    initial_adapters,
    install_adapters,
    load_adapter,
    read_manifest,
    reset_adapters,
    save_adapter,
)

__all__ = [
    "ADAPTER_KINDS",
    "BUNDLED_ADAPTER_FILE",
    "AdapterGuardMixin",
    "AdapterLoadError",
    "AdapterReplacedError",
    "DualContextAttnProcessor",
    "ReferenceBank",
    "ReferencePatchAttnProcessor",
    "adapter_parameters",
    "adapter_processors",
    "adapter_state_dict",
    "initial_adapters",
    "install_adapters",
    "load_adapter",
    "read_manifest",
    "reset_adapters",
    "save_adapter",
    "token_mask",
]
