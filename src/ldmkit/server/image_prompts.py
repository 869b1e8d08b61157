"""IP-Adapters over HTTP, as the popular web UI's ControlNet extension takes them: a unit in
`alwayson_scripts.ControlNet.args` whose module is one of the extension's ip-adapter preprocessors (the
image tower, e.g. "ip-adapter_clip_sd15") or whose model names an IP-Adapter `ldmkit serve --ip-adapter`
offers, with its image, weight and guidance start/end. The tower is the --image-encoder whose width the
adapter reads, else the image_encoder/ folder beside the adapter. Files are read once, on the worker."""

from pathlib import Path

from ldmkit.errors import RequestError

# The extension's preprocessor names for IP-Adapters' image towers (any of them: ldmkit picks the tower
# the adapter reads).
MODULES = (
    "ip-adapter-auto",
    "ip-adapter_clip_sd15",
    "ip-adapter_clip_h",
    "ip-adapter_clip_sdxl",
    "ip-adapter_clip_g",
    "ip-adapter_clip_sdxl_plus_vith",
)


class ImagePrompts:
    def __init__(self, adapters: list[str], encoders: list[str]):
        self.paths = {Path(p).stem: Path(p) for p in adapters}
        self.encoder_paths = [Path(p) for p in encoders]
        self._adapters: dict[Path, object] = {}
        self._encoders: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.paths)

    def is_unit(self, unit: dict) -> bool:
        module = str(unit.get("module", ""))
        return module.startswith("ip-adapter") or str(unit.get("model", "")).split(" [")[0] in self.paths

    def _encoder(self, path: Path):
        from ldmkit.checkpoints.image_encoder_files import load_image_encoder

        if path not in self._encoders:
            self._encoders[path] = load_image_encoder(path)
        return self._encoders[path]

    def read(self, name: str):
        """(adapter, image encoder) for an offered adapter's name (a title's hash suffix ignored)."""
        from ldmkit.checkpoints.ip_adapter_files import find_image_encoder, read_ip_adapter

        stem = name.split(" [")[0]
        if stem not in self.paths:
            raise RequestError(f"IP-Adapter model {name!r} not found; available: {', '.join(self.paths) or 'none'}")
        path = self.paths[stem]
        if path not in self._adapters:
            self._adapters[path] = read_ip_adapter(path)
        found = self._adapters[path]
        c = found.config
        for where in self.encoder_paths:
            encoder = self._encoder(where)
            if (encoder.width if c.reads_hidden_states else encoder.embed_dim) == c.image_dim:
                return found.adapter, encoder
        beside = find_image_encoder(path)
        if beside is None:
            raise RequestError(f"IP-Adapter {stem} needs {found.encoder}: the server has none (--image-encoder)")
        return found.adapter, self._encoder(beside)
