"""The checkpoints `ldmkit serve` offers, titled as the web UI titles them, the one loaded (with its tiny
decoder, if --tiny-decoder has one for it), and the ControlNets and IP-Adapters offered by name."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldmkit.errors import ConfigError, LdmkitError, NotFoundError, RequestError
from ldmkit.server.image_prompts import ImagePrompts

log = logging.getLogger("ldmkit.server")

if TYPE_CHECKING:
    from ldmkit.server.app import ServeConfig


class Models:
    """The checkpoints on offer (titled as the web UI titles them) and the one loaded."""

    def __init__(self, config: "ServeConfig"):
        from ldmkit.bundled import BUNDLED, HERE, resolve

        self.paths: dict[str, Path] = {}  # model_name -> path
        for name, entry in BUNDLED.items():
            if (HERE / entry.file).is_file():
                self.paths[name] = HERE / entry.file
        if config.models_dir:
            for p in sorted(Path(config.models_dir).expanduser().glob("*")):
                if p.suffix in (".safetensors", ".ckpt") or (p / "model_index.json").is_file():
                    self.paths.setdefault(p.stem if p.is_file() else p.name, p)
        first, _ = resolve(config.model)
        self.default = next((n for n, p in self.paths.items() if p == first), None)
        if self.default is None:
            self.default = first.stem if first.is_file() else first.name
            self.paths[self.default] = first
        self._hashes: dict[str, str] = {}
        self.pipe = None
        self.loaded: str | None = None
        self.controlnets: dict[str, Path] = {Path(p).stem: Path(p) for p in config.controlnets}
        self.lora_dir = config.lora_dir
        self.upscaler_dir = config.upscaler_dir
        self._controlnet_files: dict[Path, Any] = {}
        self.image_prompts = ImagePrompts(config.ip_adapters, config.image_encoders)
        self.embeddings_dir = config.embeddings_dir
        self.refiner_pipe, self.refiner_loaded = None, None  # SDXL's refiner, the last one asked for
        self.tiny_decoder = config.tiny_decoder  # a TAESD file or a folder of them (give_tiny_decoder)
        if self.tiny_decoder and not Path(self.tiny_decoder).expanduser().exists():
            raise ConfigError(f"--tiny-decoder {self.tiny_decoder}: no such file or folder")
        self.tiny_notes: dict[str, str] = {}  # model name -> why it has no tiny decoder
        self.backend = config.backend

    def short_hash(self, name: str) -> str | None:
        """The file's full sha256 hex digest (titles show its first 10 digits), read once; None for a folder
        and for a file of 256 MiB or more."""
        from ldmkit.checkpoints.files import sha256_file

        path = self.paths[name]
        if name not in self._hashes and path.is_file() and path.stat().st_size < 2**28:
            self._hashes[name] = sha256_file(path)
        return self._hashes.get(name)

    def title(self, name: str) -> str:
        h = self.short_hash(name)
        filename = self.paths[name].name
        return f"{filename} [{h[:10]}]" if h else filename

    def find(self, wanted: str) -> str:
        """A model by title, file name, name, or title without its hash."""
        for name in self.paths:
            if wanted in (name, self.paths[name].name, str(self.paths[name])) or wanted == self.title(name):
                return name
            if wanted.split(" [")[0] in (self.paths[name].name, name):
                return name
        raise NotFoundError(f"model {wanted!r} not found; available: {', '.join(self.titles())}")

    def titles(self) -> list[str]:
        return [self.title(n) for n in self.paths]

    def load(self, name: str):
        """On the worker thread only."""
        if self.loaded != name:
            from ldmkit.bundled import BUNDLED, HERE
            from ldmkit.pipelines import Pipeline

            self.pipe, self.loaded = None, None  # free the old model first; a failed load leaves none
            bundled = name in BUNDLED and self.paths[name].parent == HERE  # not a same-named file of --models-dir
            self.pipe = Pipeline.load(f"bundled:{name}" if bundled else self.paths[name])
            self.pipe.lora_dir = self.lora_dir
            self.pipe.upscaler_dir = self.upscaler_dir
            if self.embeddings_dir:
                self.pipe.embeddings.load_folder(self.embeddings_dir)
            self.give_tiny_decoder(self.pipe, name)
            self.pipe.set_backend(self.backend)
            self.loaded = name
        return self.pipe

    def give_tiny_decoder(self, pipe, name: str) -> None:
        """Model `name`'s tiny decoder from --tiny-decoder. A folder is searched for the family's published
        file, as `ldmkit generate` does: none there, the model simply has none. A file (or one found) that
        cannot decode this model's latents is refused for this model alone, in one warning line: the model
        still serves, with the full decoder. Why a model has none is kept for the 422 of a TAESD request."""
        from ldmkit.checkpoints.taesd_files import find_tiny_decoder

        self.tiny_notes.pop(name, None)
        if not self.tiny_decoder:
            return
        path = Path(self.tiny_decoder).expanduser()
        try:
            if path.is_dir() and not (path / "config.json").is_file():  # a folder of files, not a diffusers one
                path = find_tiny_decoder(path, pipe.model.config.family)
        except ConfigError as e:
            self.tiny_notes[name] = " ".join(str(e).split())
            log.info("model %s: no tiny decoder (%s)", name, self.tiny_notes[name])
            return
        try:
            pipe.codec.set_tiny_decoder(path)
        except LdmkitError as e:
            self.tiny_notes[name] = " ".join(str(e).split())
            log.warning("model %s: tiny decoder refused: %s", name, self.tiny_notes[name])

    def refiner(self, name: str | None):
        """The refiner a request names (None: none), loaded once and kept while it is asked for. On the
        worker thread only."""
        if name is None:
            return None
        if self.refiner_loaded != name:
            from ldmkit.pipelines import Pipeline

            self.refiner_pipe, self.refiner_loaded = None, None
            self.refiner_pipe = Pipeline.load(self.paths[name])
            self.refiner_loaded = name
        return self.refiner_pipe

    def controlnet_path(self, name: str) -> Path:
        from ldmkit.bundled import bundled_controlnet

        if name in self.controlnets:
            return self.controlnets[name]
        stem = name.split(" [")[0]
        if stem in self.controlnets:
            return self.controlnets[stem]
        try:
            path = bundled_controlnet(self.pipe.path if self.pipe else None)
        except LdmkitError:
            path = None
        if path is not None and stem in (path.stem, path.name):
            return path
        raise RequestError(f"ControlNet model {name!r} not found; available: {', '.join(self.controlnet_names())}")

    def controlnet(self, name: str, base):
        """A ControlNet by name, read once and checked against the loaded model's UNet."""
        from ldmkit.checkpoints.controlnet_files import load_controlnet

        path = self.controlnet_path(name)
        if path not in self._controlnet_files:
            self._controlnet_files[path] = load_controlnet(path, base=base)
        net = self._controlnet_files[path]
        net.check_base(base)
        return net

    def controlnet_names(self) -> list[str]:
        from ldmkit.bundled import BUNDLED, HERE

        names = list(self.controlnets)
        names += [Path(e.controlnet).stem for e in BUNDLED.values() if e.controlnet and (HERE / e.controlnet).is_file()]
        return names
