"""What executes a backbone's forward: PyTorch eagerly (the default), torch.compile, or OpenVINO."""

from pathlib import Path

import torch

from ldmkit.errors import ConfigError


def compile_forward(module: torch.nn.Module, freezing: bool = True) -> None:
    """Opt-in torch.compile (inductor) of the forward. The first call at each shape compiles (tens of seconds
    on two cores); measured: a 13M UNet in bf16 with freezing 1.8x over eager, the SD 1.5 UNet 0.97x after an
    84 s first call (benchmarks/compile_unet.py): worth it for small models only. Options are passed per
    compile: no global setting changes. Only the forward is compiled, so the module, its weights and its
    state dict stay as they are."""
    if getattr(module, "_ldmkit_compiled", False):
        return
    if "forward" in vars(module):
        raise ConfigError("--backend openvino and --compile: choose one")
    module.forward = torch.compile(module.forward, options={"freezing": freezing})
    module._ldmkit_compiled = True


def set_backend(module: torch.nn.Module, backend: str, cache: Path | None = None) -> None:
    """Make `backend` (torch or openvino) execute `module`'s forward. Not with torch.compile: choose one."""
    if backend not in ("torch", "openvino"):
        raise ConfigError(f"backend {backend!r}: allowed torch, openvino")
    compiled = getattr(module, "_ldmkit_compiled", False)
    if compiled and backend == "openvino":
        raise ConfigError("--backend openvino and --compile: choose one")
    if "forward" in vars(module) and not compiled:  # on OpenVINO: back to the class's forward
        del module.forward
    if backend == "openvino":
        from ldmkit.models.openvino_backend import OpenVINOBackbone

        module.forward = OpenVINOBackbone(module, cache)
