"""Text-to-image, image-to-image and inpainting with one call:

    pipe = Pipeline.load("model.safetensors")
    result = pipe("a red circle above a blue square", steps=20, cfg=7, seed=1)
    result.images[0].save("out.png")

A call's keyword arguments are `GenerationParams` fields (pipelines/params.py, which owns every default
and check); `pipe(params)` takes a GenerationParams as it is. Inpainting works two ways: a 9-channel
inpainting model gets the mask and the masked image's latents as extra input channels; an ordinary
model keeps its prediction outside the mask equal to the original latents at every step (latent
blending). Either way the original pixels are composited back outside the (blurred) mask."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit import __version__
from ldmkit.checkpoints.families import FAMILIES
from ldmkit.checkpoints.files import sha256_file
from ldmkit.checkpoints.lora_files import find_lora, read_lora
from ldmkit.data.vocabulary import unknown_words
from ldmkit.diffusion.denoiser import Blend, Conditioning, Control, Denoiser
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.sampling import generators_for, per_image_noise, sample_latents, sampling_schedule, split_walk
from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
from ldmkit.errors import ConfigError
from ldmkit.images import latent_preview, mask_to_tensor, pil_to_tensor, tensor_to_pil
from ldmkit.models.backends import compile_forward, set_backend
from ldmkit.models.embeddings import Embeddings
from ldmkit.models.ldm import LatentDiffusion, build_backbone
from ldmkit.models.lora import Lora, LoraSet, parse_lora_tags
from ldmkit.models.precision import resolve_precision
from ldmkit.models.prompts import encode_prompts
from ldmkit.models.unet import FeatureCache
from ldmkit.nn.embedding import guidance_scale_embedding
from ldmkit.pipelines import hires
from ldmkit.pipelines.codec import LatentCodec
from ldmkit.pipelines.hires import second_pass_steps
from ldmkit.pipelines.image_prompt import attached
from ldmkit.pipelines.micro_conditioning import added_vectors
from ldmkit.pipelines.params import CALL_DEFAULTS, LCM_DEFAULTS, GenerationParams, RunFacts, to_infotext
from ldmkit.pipelines.refiner import check_refiner, refine
from ldmkit.pipelines.upscalers import ModelUpscaler, UpscalerCache

log = logging.getLogger(__name__)
PREVIEW_METHODS = ("auto", "tiny", "full", "cheap")  # Pipeline.preview's


class Interrupted(Exception):
    """Raised by a step callback to stop sampling; the call then returns the current x0 prediction,
    decoded (what the popular UI shows after an interrupt)."""

    def __init__(self, x0: torch.Tensor | None = None):
        super().__init__("interrupted")
        self.x0 = x0


@dataclass
class StepInfo:
    """What the per-step callback sees. `preview(method="auto")` makes RGB previews of the current x0
    (Pipeline.preview)."""

    step: int
    steps: int
    latents: torch.Tensor
    x0: torch.Tensor
    preview: Callable[[], list[Image.Image]]


@dataclass
class Result:
    images: list[Image.Image]
    params: GenerationParams  # as run: every default filled in, the seed drawn
    seeds: list[int]
    infotexts: list[str]
    latents: torch.Tensor = field(repr=False)
    control_images: list[Image.Image] = field(default_factory=list)  # the preprocessed control images
    interrupted: bool = False  # stopped by the callback: images are the last x0 prediction
    warnings: list[str] = field(default_factory=list)  # e.g. words a closed-vocabulary model does not know


class Pipeline:
    def __init__(
        self, model: LatentDiffusion, name: str = "model", path: Path | None = None, defaults: dict | None = None
    ):
        self.model = model.eval()
        self.name = name
        self.path = path
        # What a call leaves out: ours (consistency models: diffusers' LCM pipeline's), then the
        # settings chosen for this model (bundled models).
        family = FAMILIES.get(model.config.family)
        base = LCM_DEFAULTS if model.config.unet.time_cond_proj_dim else CALL_DEFAULTS
        if model.config.schedule.prediction_type == "flow":  # a flow model samples with euler or heun
            base = {**base, "sampler": "euler"}
        self.defaults = {**base, **(family.call_defaults if family else {}), **(defaults or {})}
        self._hash: str | None = None
        self.lora_dir: Path | None = None  # where <lora:NAME:WEIGHT> tags look
        self.upscaler_dir: Path | None = None  # where the hires fix's model upscalers are found by name
        self.upscalers = UpscalerCache()  # the last model upscaler read
        self.refiner: Pipeline | None = None  # SDXL's refiner, for runs with refiner_switch_at
        self.loras = LoraSet(model)  # merged LoRAs; each call makes its own set the merged one
        self.embeddings = Embeddings(model.text_encoder)  # textual inversion, used by name in prompts
        self.codec = LatentCodec(model.vae, model.config.image_size, model.config.family)
        self.precision = "fp32"  # set_precision
        self.backend = "torch"  # set_backend
        self.max_prompt_chunks: int | None = None  # 75-token chunks a prompt may take (a server's bound)
        self.vocabulary: tuple[str, ...] = model.config.vocabulary  # a closed world's words (data/vocabulary.py)
        self._lora_files: dict[Path, Lora] = {}

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        vae: str | Path | None = None,
        overrides: dict | None = None,
        precision: str = "auto",
        text_encoders: str | Path | None = None,
        tiny_decoder: str | Path | None = None,
    ) -> "Pipeline":
        """A model file or folder, or a bundled model by name ("shapes"; the default when no path is
        given), computing in `precision` (see set_precision); text_encoders: a folder with the text towers
        an SD3 single file lacks (checkpoints/sd3_towers.py); tiny_decoder: see codec.set_tiny_decoder."""
        from ldmkit.bundled import bundled_entry, resolve
        from ldmkit.checkpoints.single_file import load_model
        from ldmkit.data.vocabulary import shapes_vocabulary
        from ldmkit.pipelines.allocator import tune_allocator

        tune_allocator()  # process-wide malloc settings for CPU inference (see allocator.py)
        resolve_precision(precision, 0)  # refuse a bad name before reading anything
        path, defaults = resolve(path)

        def dtype_rule(config) -> torch.dtype:
            # decided from the config, before the weights are read, so a bf16 load converts as it reads
            with torch.device("meta"):
                n = sum(p.numel() for p in build_backbone(config.unet).parameters())
            return torch.bfloat16 if resolve_precision(precision, n) == "bf16" else torch.float32

        model = load_model(path, vae=vae, overrides=overrides, dtype_rule=dtype_rule, text_encoders=text_encoders)
        model.use_measured_memory_format()
        pipe = cls(model, name=path.stem if path.is_file() else path.name, path=path, defaults=defaults)
        pipe.set_precision(precision)
        pipe.codec.set_tiny_decoder(tiny_decoder)
        if not pipe.vocabulary and getattr(bundled_entry(path), "world", None) == "shapes":
            pipe.vocabulary = shapes_vocabulary()  # trained before models stored their vocabulary
        return pipe

    @property
    def model_hash(self) -> str:
        """The web UI's short model hash: the first 10 hex digits of the file's sha256 (a folder: of its
        UNet weights)."""
        if self._hash is None:
            target = self.path
            if target is not None and target.is_dir():
                target = next(iter(sorted(target.glob("unet/diffusion_pytorch_model*"))), None)
            if target is None:
                return ""
            self._hash = sha256_file(target)[:10]
        return self._hash

    def __call__(
        self,
        prompt: str | list[str] | GenerationParams = "",
        *,
        callback: Callable[[StepInfo], None] | None = None,
        **params,
    ) -> Result:
        """Generate images. Keyword arguments are GenerationParams fields: a list of prompts makes one
        image each (image i with seed + i), as diffusers takes a list; loras: (file, strength) pairs
        merged for this call, besides the prompt's <lora:NAME:WEIGHT> tags (looked up in
        `self.lora_dir`); feature_cache N > 1: a full UNet call every N calls, the ones between reuse
        its deep features (DeepCache; off by default)."""
        if isinstance(prompt, GenerationParams):
            p = replace(prompt, **params) if params else prompt
        else:
            p = GenerationParams(prompt=prompt, **params)
        p = p.for_model(self.model, self.defaults, self.name)
        warnings = self._unknown_words(p)
        if self.model.config.sd3:  # a prompt over T5's limit is truncated, as diffusers does: said
            warnings += self.model.text_encoder.truncation_notes([*dict.fromkeys(p.prompts), p.negative_prompt], 256)
        walk = self._walk(p)  # a spacing or scheduler config the sampler cannot follow: refused before any work
        self._split(p, walk)  # a refiner that cannot continue, or a switch leaving a side no steps: likewise
        self._model_upscaler(p)  # a hires upscaler that is no model upscaler file: refused before any work
        self._use_loras(p)
        if p.hires_prompt or p.hires_negative_prompt:
            self._tagged_loras(p.second_pass())  # the second pass's LoRAs found and read before any work
        for ci in p.control:
            ci.net.to(next(self.model.unet.parameters()).dtype)  # residuals join the UNet in its dtype
        interrupted, control_images = False, []
        try:
            with torch.no_grad(), attached(self.model.unet, p.image_prompts):
                z, images, control_images = self._generate(p, walk, callback)
        except Interrupted as stop:
            if stop.x0 is None:
                raise
            interrupted, z = True, stop.x0
            with torch.no_grad():
                images = self.decode(z)
        infotexts = [self.infotext(p, i) for i in range(p.batch)]
        return Result(tensor_to_pil(images), p, p.seeds, infotexts, z, control_images, interrupted, warnings)

    def _walk(self, p: GenerationParams) -> SamplingSchedule:
        """The sigmas this run walks: all the sampler's steps, or the last ones when starting from an
        image (an inpainting model at full strength starts from noise, as diffusers does)."""
        c = self.model.config
        noise = NoiseSchedule.from_config(c.schedule, self.model.alphas_cumprod)
        from_image = p.init_image is not None and not (c.unet.in_channels == 9 and p.strength >= 1.0)
        strength = p.strength if from_image else None
        spec = SAMPLERS[p.sampler]
        # a transformer's tokens: the latent's patches (a resolution-dependent shift counts them)
        patch = c.vae.downsample_factor * getattr(c.unet, "patch_size", 1)
        tokens = (p.height // patch) * (p.width // patch)
        return sampling_schedule(spec, noise, p.steps, p.timestep_spacing, c.schedule.diffusers, strength, tokens)

    def _unknown_words(self, p: GenerationParams) -> list[str]:
        """Words of the prompts a closed-vocabulary model never saw: said, since they change nothing."""
        texts = [*dict.fromkeys(p.prompts), p.negative_prompt, p.hires_prompt, p.hires_negative_prompt]
        # an embedding's name is a word the model was taught after its training (textual inversion)
        unknown = [w for w in unknown_words(texts, self.vocabulary) if w not in self.embeddings.vectors]
        if not unknown:
            return []
        message = (
            f"{self.name} was trained on a closed vocabulary and does not know: {', '.join(unknown[:20])} "
            "(those words change nothing it draws)"
        )
        log.warning(message)
        return [message]

    def _use_loras(self, p: GenerationParams) -> None:
        """Merge this call's LoRAs: the ones given, and the ones the prompts' tags name."""
        self.loras.apply([(self._read_lora(path), w) for path, w in p.loras] + self._tagged_loras(p))

    def _tagged_loras(self, p: GenerationParams) -> list:
        """The LoRAs the prompts' <lora:NAME:WEIGHT> tags name, found in `self.lora_dir`."""
        prompts = [p.prompt] if isinstance(p.prompt, str) else sorted(set(p.prompt))
        tags = [tag for text in (*prompts, p.negative_prompt) for tag in parse_lora_tags(text)[1]]
        return [(self._read_lora(find_lora(name, self.lora_dir)), w) for name, w in tags]

    def _read_lora(self, path: Path):
        if path not in self._lora_files:  # each file read once
            self._lora_files[path] = read_lora(path, self.model)
        return self._lora_files[path]

    def _conditioning(self, p: GenerationParams, device) -> tuple[Conditioning, list[Image.Image]]:
        """Prompt states, guidance and ControlNet hints for every image of the batch."""
        m, c = self.model, self.model.config
        embedded_guidance = bool(c.unet.time_cond_proj_dim)
        use_uncond = p.cfg != 1.0 and not embedded_guidance
        negative = parse_lora_tags(p.negative_prompt)[0]
        prompts, negatives = [parse_lora_tags(x)[0] for x in p.prompts], [negative] * p.batch if use_uncond else None
        if c.sd3:  # its three towers read prompts as diffusers' pipeline does (models/sd3_text.py)
            states = m.text_encoder.encode_prompts(prompts, negatives, p.clip_skip)
        else:
            states = encode_prompts(
                m.text_encoder,
                prompts,
                negatives,
                p.prompt_mode,
                self.embeddings,
                clip_skip=p.clip_skip,
                max_chunks=self.max_prompt_chunks,
            )
        if use_uncond and c.zero_empty_negative and not negative.strip():
            states = states._replace(uncond=torch.zeros_like(states.context))
            if states.pooled is not None:
                states = states._replace(uncond_pooled=torch.zeros_like(states.pooled))
        cond = Conditioning(states.context, states.uncond, cfg_scale=p.cfg, guidance_rescale=p.guidance_rescale)
        if c.unet.addition_time_embed_dim:
            cond.y, cond.uncond_y = added_vectors(c.unet, states.pooled, states.uncond_pooled, p)
        elif c.sd3:  # the pooled text vector is the transformer's y itself
            cond.y, cond.uncond_y = states.pooled, states.uncond_pooled
        if embedded_guidance:
            w = torch.full((p.batch,), float(p.cfg))
            cond.timestep_cond = guidance_scale_embedding(w, c.unet.time_cond_proj_dim).to(device)
        control_images = []
        for ci in p.control:
            image, hint = ci.hint(p.width, p.height)
            control_images.append(image)
            hint = hint.to(device).expand(p.batch, -1, -1, -1)
            cond.control.append(Control(ci.net, hint, ci.strength, ci.start, ci.end, ci.guess_mode))
        cond.image_prompts = [ip.prompt(p.batch, use_uncond, device) for ip in p.image_prompts]
        return cond, control_images

    def _start(self, p: GenerationParams, cond: Conditioning, generators, latent_shape, device):
        """Image-to-image and inpainting: (initial latents or None, initial noise, pixels, blurred pixel
        mask), with the inpainting model's extra channels or the blend put into `cond`. Each image's
        generator draws as diffusers' pipelines draw: the image's posterior sample (when it is used),
        the initial noise, then the masked image's posterior sample."""
        m = self.model
        inpaint_model = m.config.unet.in_channels == 9
        from_noise = inpaint_model and p.strength >= 1.0  # as diffusers: an inpainting model at full strength
        init_latents = pixels = pixel_mask = None
        if p.init_image is not None:
            pixels = pil_to_tensor(p.init_image, p.width, p.height).to(device)
            if not from_noise:
                posterior = self.encode(pixels)
                init_latents = torch.cat([m.vae.scale(posterior.sample(g)) for g in generators])
        noise = per_image_noise(generators, latent_shape).to(device)
        if p.mask is not None:
            pixel_mask = mask_to_tensor(p.mask, p.width, p.height, p.mask_blur).to(device)
            hard = (mask_to_tensor(p.mask, p.width, p.height, 0) >= 0.5).float().to(device)
            if inpaint_model or p.inpaint_blend == "noised":
                masked = self.encode(pixels * (1 - hard))
                # diffusers samples the masked image's posterior for 4-channel models too, unused: drawn
                # here alike, each seed's later (ancestral) noise stays diffusers'
                masked = torch.cat([m.vae.scale(masked.sample(g)) for g in generators])
            if inpaint_model:
                hard = F.interpolate(hard, size=latent_shape[1:])
                cond.concat = torch.cat([hard.expand(p.batch, -1, -1, -1), masked], dim=1)
            elif p.inpaint_blend == "noised":
                cond.blend = Blend(F.interpolate(hard, size=latent_shape[1:]), init_latents, noise)
                if p.strength >= 1.0:
                    init_latents = None  # diffusers starts from pure noise, blending from the second step
            else:
                keep = F.interpolate(pixel_mask, size=latent_shape[1:], mode="bilinear", align_corners=False)
                cond.blend = Blend(keep, init_latents)
        return init_latents, noise, pixels, pixel_mask

    def _generate(self, p: GenerationParams, walk: SamplingSchedule, callback):
        m, c = self.model, self.model.config
        spec = SAMPLERS[p.sampler]
        device = next(m.unet.parameters()).device
        cond, control_images = self._conditioning(p, device)
        generators = generators_for(p.seed, p.batch)
        f = c.vae.downsample_factor
        latent_shape = (4 if c.unet.in_channels == 9 else c.unet.in_channels, p.height // f, p.width // f)
        init_latents, initial_noise, pixels, pixel_mask = self._start(p, cond, generators, latent_shape, device)
        noise = NoiseSchedule.from_config(c.schedule, m.alphas_cumprod)
        cache = FeatureCache(p.feature_cache) if p.feature_cache > 1 else None
        base_walk, rest = self._split(p, walk)
        denoiser = Denoiser(m.unet, noise, c.schedule.prediction_type, base_walk, cache)
        second = second_pass_steps(p.hires_steps or p.steps, p.strength)[1] if p.hires else 0
        total = p.steps + second  # one progress over both passes, as the web UI counts them

        def on_step(i, x, x0):
            if callback is not None:
                callback(StepInfo(i + 1, total, x, x0, lambda method="auto": self.preview(x0, method)))

        options = {"eta": p.eta} if p.sampler == "ddim" else {}
        z = sample_latents(
            denoiser, spec, cond, generators, latent_shape, init_latents, on_step, noise=initial_noise, **options
        )
        if rest is not None:  # SDXL's refiner takes over (pipelines/refiner.py)
            k = len(base_walk.timesteps)
            z = refine(self.refiner, p, z, rest, generators, lambda i, x, x0: on_step(k + i, x, x0))
        if p.hires:
            z = hires.run_second_pass(self, p, z, cond, noise, lambda i, x, x0: on_step(p.steps + i, x, x0))
        if cond.blend is not None:  # the last step's blend: the original itself
            z = cond.blend.keep * z + (1 - cond.blend.keep) * cond.blend.z_init
        # the refiner continues the base's latent space (check_refiner): the base's tiny decoder reads it too
        images = (self.refiner if rest is not None and self.codec.decoder == "full" else self).decode(z)
        if pixel_mask is not None:
            images = pixel_mask * images + (1 - pixel_mask) * pixels
        return z, images, control_images

    def _split(self, p: GenerationParams, walk: SamplingSchedule):
        """(the base model's walk, the refiner's or None)."""
        if p.refiner_switch_at is None:
            return walk, None
        check_refiner(self, self.refiner)
        return split_walk(walk, p.refiner_switch_at, self.model.config.schedule.num_train_timesteps)

    def _model_upscaler(self, p: GenerationParams) -> ModelUpscaler | None:
        """The hires fix's model upscaler, found in `self.upscaler_dir` and read once; None: a built-in one."""
        if not p.hires or hires.is_builtin(p.hires_upscaler):
            return None
        return self.upscalers.get(hires.model_upscaler(p.hires_upscaler, self.upscaler_dir))

    @torch.no_grad()
    def preview(self, x0: torch.Tensor, method: str = "auto") -> list[Image.Image]:
        """RGB previews of latents by the web UI's live preview methods: "tiny", the tiny decoder (its TAESD);
        "full", the autoencoder (its Full); "cheap", the model's fitted linear map, SD's, or (small models,
        where decoding is cheap) the decoder itself (its Approx cheap); "auto": tiny if loaded, else cheap."""
        if method not in PREVIEW_METHODS:
            raise ConfigError(f"preview method {method!r}; allowed: {', '.join(PREVIEW_METHODS)}")
        if method in ("tiny", "full") or (method == "auto" and self.codec.tiny is not None):
            return tensor_to_pil(self.codec.decode(x0, "full" if method == "full" else "tiny"))
        c = self.model.config
        if c.latent_rgb is not None:
            return latent_preview(x0, c.latent_rgb)
        if c.family.startswith("sd"):
            return latent_preview(x0)
        return tensor_to_pil(self.codec.decode(x0, "full"))  # the autoencoder even when the images are tiny's

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1], fp32 (pipelines/codec.py)."""
        return self.codec.decode(z)

    def encode(self, pixels: torch.Tensor):
        return self.codec.encode(pixels)

    @property
    def tiled_vae(self) -> bool | None:
        """True: the autoencoder always in bands/tiles; False: never; None (auto): when memory requires."""
        return self.codec.tiled

    @tiled_vae.setter
    def tiled_vae(self, value: bool | None) -> None:
        self.codec.tiled = value

    def vae_tile(self, x: torch.Tensor, factor: int = 1) -> int | None:
        return self.codec.tile(x, factor)

    def set_precision(self, precision: str = "auto") -> str:
        """fp32, or bf16: the UNet's and the autoencoder's weights converted once (faster than autocast,
        which re-casts every call), while the text tower, the sampler's state and the guidance sum stay
        fp32. auto: models/precision.py's rule. Set once, at load."""
        precision = resolve_precision(precision, sum(p.numel() for p in self.model.unet.parameters()))
        if precision == "bf16":
            if next(self.model.unet.parameters()).dtype not in (torch.float32, torch.bfloat16):
                raise ConfigError("set_precision: the model is neither fp32 nor bf16")
            self.model.unet.to(torch.bfloat16)
            self.model.vae.to(torch.bfloat16)
            self.model.use_measured_memory_format()
        elif next(self.model.unet.parameters()).dtype != torch.float32:
            raise ConfigError("fp32 after bf16: reload the model (bf16 weights cannot be made exact again)")
        self.precision = precision
        return precision

    def compile(self, freezing: bool = True) -> None:
        """Opt-in torch.compile of the UNet's forward (models/backends.py: when it pays)."""
        compile_forward(self.model.unet, freezing)

    def set_backend(self, backend: str = "torch", cache: Path | None = None) -> None:
        """What executes the backbone: torch (the default) or openvino (models/openvino_backend.py; its disk
        cache in `cache`). ControlNet and feature-cache calls stay on PyTorch."""
        set_backend(self.model.unet, backend, cache)
        self.backend = backend

    def infotext(self, p: GenerationParams, index: int = 0) -> str:
        """Image `index`'s parameters text, as the web UI writes it (pipelines/params.py)."""
        used = [(self._read_lora(path), w) for path, w in p.loras] + self._tagged_loras(p)
        if p.hires_prompt or p.hires_negative_prompt:
            used += self._tagged_loras(p.second_pass())
        merged = list({lora.name: lora for lora, _ in used}.values())  # both passes', each once
        run = RunFacts(
            model_name=self.name,
            model_hash=self.model_hash,
            schedule_type=SAMPLERS[p.sampler].schedule_type(self.model.config.schedule.diffusers, p.timestep_spacing),
            precision=self.precision,
            lora_hashes=", ".join(f"{lora.name}: {lora.hash}" for lora in merged),
            refiner=f"{self.refiner.name} [{self.refiner.model_hash}]" if p.refiner_switch_at and self.refiner else "",
            vae_decoder="TAESD" if self.codec.decoder == "tiny" else "",
        )
        return to_infotext(p, index, run, f"ldmkit {__version__}")
