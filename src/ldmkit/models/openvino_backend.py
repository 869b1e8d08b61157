"""A backbone (UNet or MMDiT) executed by OpenVINO instead of PyTorch: `--backend openvino`.

On CPUs where OpenVINO's fused kernels beat our PyTorch path (docs/performance.md measures where), this runs
our own module, weights included, through OpenVINO's CPU plugin. The steps, each done once:
- per set of weights: the module is traced (TorchScript, the form OpenVINO's converter reads best) with
  dynamic batch, height, width and token count, converted, and saved as OpenVINO IR in the disk cache under
  a hash of the weights, the config and the OpenVINO version, written to temporary names and renamed, so
  a cache entry is whole or absent. The IR is read back from disk, so its weights are mapped, not copied.
- per input shape: the model is reshaped to that static shape and compiled (fp32, or bf16 for bf16 weights),
  and its first output is compared with the PyTorch module's on the same input; outside the tolerance the
  backend says so once and that shape runs on PyTorch.
Calls the converted graph cannot take (ControlNet residuals, DeepCache's feature cache, IP-Adapters' image
attention) run on PyTorch.
Weights changed in place (LoRAs merged or removed, a state dict loaded) are noticed through the tensors'
version counters, and the next call converts (or finds in the cache) the model for the new weights."""

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ldmkit.errors import ConfigError

log = logging.getLogger(__name__)

# Largest |OpenVINO - PyTorch| allowed on a shape's first call, relative to max(1, max |PyTorch|):
# fp32 agrees to ~1e-5 on the SD 1.5 UNet (docs/performance.md); bf16 rounds every matmul input.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
KEEP_ENTRIES = 3  # cache entries (one per set of weights) kept on disk; the least recently used go first
INPUTS = ("x", "t", "context", "y", "timestep_cond")


def cache_dir() -> Path:
    """LDMKIT_CACHE/openvino, else $XDG_CACHE_HOME/ldmkit/openvino, else ~/.cache/ldmkit/openvino."""
    root = os.environ.get("LDMKIT_CACHE")
    if root:
        return Path(root) / "openvino"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldmkit" / "openvino"


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise ConfigError("--backend openvino needs the openvino package: pip install 'ldmkit[openvino]'") from None
    return openvino


def weights_key(module: torch.nn.Module, inputs: tuple[str, ...]) -> str:
    """A hash of everything the converted graph depends on: every parameter and buffer (names, dtypes,
    shapes, bytes), the module's config, which inputs it takes, and the OpenVINO version."""
    ov = require_openvino()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(module).__name__}|{getattr(module, 'config', '')}|{inputs}|{ov.__version__}".encode())
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        t = tensor.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class _Positional(torch.nn.Module):
    """The backbone with the inputs present as positional arguments: what tracing records (fp32 in and out:
    numpy, which OpenVINO is fed, has no bf16)."""

    def __init__(self, module: torch.nn.Module, forward, inputs: tuple[str, ...]):
        super().__init__()
        self.module, self._forward, self.inputs = module, forward, inputs

    def forward(self, *args):
        return call(self._forward, self.inputs, args)


def call(forward, inputs: tuple[str, ...], args: tuple) -> torch.Tensor:
    """forward(x, t, context, y=..., timestep_cond=...) from the inputs present (x, t, context always)."""
    return forward(*args[:3], **dict(zip(inputs[3:], args[3:])))


def _dynamic_shapes(ov, example: tuple[torch.Tensor, ...], inputs: tuple[str, ...]) -> list:
    """Batch dynamic everywhere; height and width of the latents and the token count of the context too."""
    shapes = []
    for name, e in zip(inputs, example):
        dims = list(e.shape)
        dims[0] = -1
        if name == "x":
            dims[2] = dims[3] = -1
        if name == "context":
            dims[1] = -1
        shapes.append(ov.PartialShape(dims))
    return shapes


def _evict(folder: Path, keep: int) -> None:
    entries = sorted(folder.glob("*.xml"), key=lambda p: p.stat().st_mtime, reverse=True)
    for xml in entries[keep:]:
        for p in (xml, xml.with_suffix(".bin")):
            p.unlink(missing_ok=True)


def converted_model(forward, module: torch.nn.Module, example: tuple, inputs: tuple[str, ...], folder: Path):
    """The OpenVINO model of `module` for these inputs: from the cache if there, else traced, converted and
    saved there first. Returns (model, key, seconds spent converting: 0 when the cache had it)."""
    ov = require_openvino()
    key = weights_key(module, inputs)
    xml = folder / f"{key}.xml"
    started, seconds = time.perf_counter(), 0.0
    if xml.exists():
        os.utime(xml)  # recently used: kept by the eviction
    else:
        folder.mkdir(parents=True, exist_ok=True)
        if next(module.parameters()).dtype != torch.float32:
            # OpenVINO's graph passes reject bf16 weights next to fp32 ones (our norms compute in fp32):
            # convert an fp32 copy, and let the compile hint run it in bf16, as OpenVINO's own pipelines do
            fp32 = type(module)(module.config).eval()
            fp32.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
            module, forward = fp32, fp32.forward
        with torch.no_grad():
            traced = torch.jit.trace(_Positional(module, forward, inputs).eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, input=_dynamic_shapes(ov, example, inputs))
        tmp = folder / f".{key}.{os.getpid()}.tmp.xml"
        ov.save_model(model, tmp, compress_to_fp16=False)  # fp16-compressed weights would not be ours
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)  # the .xml last: its presence means the entry is whole
        del model, traced
        _evict(folder, KEEP_ENTRIES)
        seconds = time.perf_counter() - started
    return ov.Core().read_model(xml), key, seconds


class OpenVINOBackbone:
    """Stands in for a backbone's `forward` (same arguments); see the module's docstring."""

    def __init__(self, module: torch.nn.Module, folder: Path | None = None):
        self.ov = require_openvino()
        self.module, self.torch_forward = module, module.forward
        self.folder = folder or cache_dir()
        self.core = self.ov.Core()
        self.models: dict[tuple, object] = {}  # inputs present -> converted model (for the current weights)
        self.compiled: dict[tuple, object] = {}  # (inputs, shapes) -> compiled model, or None: runs on PyTorch
        self.state = None
        self.seconds = {"convert": 0.0, "compile": 0.0}  # what this backend spent setting up (bench reports it)

    def _weights_state(self) -> tuple:
        return tuple((id(p), p._version) for p in list(self.module.parameters()) + list(self.module.buffers()))

    def _compile(self, inputs: tuple[str, ...], args: tuple[torch.Tensor, ...]):
        if inputs not in self.models:
            example = tuple(a.float() if a.is_floating_point() else a for a in args)  # fp32 in (_Positional)
            model, key, seconds = converted_model(self.torch_forward, self.module, example, inputs, self.folder)
            self.models[inputs] = model
            self.seconds["convert"] += seconds
        model = self.models[inputs].clone()
        model.reshape({model.inputs[i]: self.ov.PartialShape(list(a.shape)) for i, a in enumerate(args)})
        dtype = next(self.module.parameters()).dtype
        started = time.perf_counter()
        compiled = self.core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            },
        )
        self.seconds["compile"] += time.perf_counter() - started
        return compiled

    def _run(self, compiled, args: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        arrays = [a.float().numpy() if a.is_floating_point() else a.numpy() for a in args]
        out = torch.from_numpy(np.asarray(compiled(arrays)[0]))
        return out.to(dtype)

    def __call__(self, x, timesteps, context=None, y=None, timestep_cond=None, control=None, cache=None):
        kw = {"y": y, "timestep_cond": timestep_cond}
        attached = getattr(self.module, "image_prompts_attached", 0)
        if control is not None or cache is not None or context is None or attached:
            return self.torch_forward(x, timesteps, context, control=control, cache=cache, **kw)
        state = self._weights_state()
        if state != self.state:  # new weights: every converted and compiled model is stale
            self.models.clear(), self.compiled.clear()
            self.state = state
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        values = {"x": x, "t": t, "context": context, "y": y, "timestep_cond": timestep_cond}
        inputs = tuple(name for name in INPUTS if values[name] is not None)
        args = tuple(values[name].contiguous() for name in inputs)
        shape_key = (inputs, tuple(tuple(a.shape) for a in args))
        if shape_key not in self.compiled:
            compiled = self._compile(inputs, args)
            self.compiled[shape_key] = self._checked(compiled, args, inputs, shape_key[1])
        compiled = self.compiled[shape_key]
        if compiled is None:
            return self.torch_forward(x, timesteps, context, **kw)
        return self._run(compiled, args, x.dtype)

    def _checked(self, compiled, args, inputs, shapes):
        """`compiled` if its output on these inputs agrees with PyTorch's, else None (that shape runs on PyTorch)."""
        with torch.no_grad():
            ours = call(self.torch_forward, inputs, args).float()
        theirs = self._run(compiled, args, torch.float32)
        dtype = next(self.module.parameters()).dtype
        diff = (theirs - ours).abs().max().item()
        limit = TOLERANCE.get(dtype, 5e-2) * max(1.0, ours.abs().max().item())
        if not diff <= limit:
            log.warning(f"OpenVINO differs from PyTorch by {diff:.3g} at shapes {shapes}: running them on PyTorch")
            return None
        return compiled
