"""The training commands: train-autoencoder, train, train-controlnet, distill-lcm, train-lora, train-embedding,
distill-tiny-autoencoder, train-image-encoder, train-ip-adapter, train-text-encoder, train-video."""

import json


def _train(args, config_class, task_class, product, adjust=None) -> int:
    """The training commands: join the process group, read the config, run, report. product: the
    file the run ends with, or a function of the config giving it (LoRAs and embeddings are named)."""
    from ldmkit.config import load_yaml, to_dict
    from ldmkit.errors import ConfigError
    from ldmkit.training.distributed import init_from_env, shutdown
    from ldmkit.training.loop import Trainer

    init_from_env()
    config = load_yaml(config_class, args.config)
    if args.run_dir:
        config.run.dir = args.run_dir
    if args.threads is not None:  # the machine's business, not the recipe's: a resumed run may change it
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: allowed: 1 or more")
        config.run.threads = args.threads
    if args.steps is not None:  # train further than the recipe's length: a finished run continues with --resume
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: allowed: 1 or more")
        config.run.steps = args.steps
    if adjust:
        adjust(config)
    trainer = Trainer(task_class(config), config.run, resume=args.resume, config_record=to_dict(config))
    last = trainer.fit(progress=not args.quiet)
    shutdown()
    key = task_class.name if callable(product) else product.split(".")[0]
    product = product(config) if callable(product) else product
    if trainer.main:
        print(
            json.dumps(
                {
                    "run": str(trainer.dir),
                    "step": trainer.step,
                    "last": last,
                    key: str(trainer.dir / product),
                }
            )
        )
    return 0


def cmd_train_autoencoder(args) -> int:
    from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig

    return _train(args, AutoencoderTrainConfig, AutoencoderTask, "autoencoder.safetensors")


def cmd_train(args) -> int:
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    def init_from(config):
        if args.init_from:
            config.init_from, config.autoencoder = args.init_from, None

    return _train(args, LDMTrainConfig, LDMTask, "model.safetensors", init_from)


def cmd_train_controlnet(args) -> int:
    from ldmkit.training.controlnet import ControlNetTask, ControlNetTrainConfig

    return _train(args, ControlNetTrainConfig, ControlNetTask, "controlnet.safetensors")


def cmd_train_lora(args) -> int:
    from ldmkit.training.lora import LoraTask, LoraTrainConfig

    return _train(args, LoraTrainConfig, LoraTask, lambda c: f"{c.name}.safetensors")


def cmd_train_embedding(args) -> int:
    from ldmkit.training.embedding import EmbeddingTask, EmbeddingTrainConfig

    return _train(args, EmbeddingTrainConfig, EmbeddingTask, lambda c: f"{c.word}.safetensors")


def cmd_distill_lcm(args) -> int:
    from ldmkit.training.lcm import DistillConfig, DistillTask

    return _train(args, DistillConfig, DistillTask, "model.safetensors")


def cmd_distill_tiny(args) -> int:
    from ldmkit.training.tiny_autoencoder import TinyDistillConfig, TinyDistillTask

    return _train(args, TinyDistillConfig, TinyDistillTask, "tiny-autoencoder.safetensors")


def cmd_train_image_encoder(args) -> int:
    from ldmkit.training.image_tower import ImageTowerTask, ImageTowerTrainConfig

    return _train(args, ImageTowerTrainConfig, ImageTowerTask, "image-encoder")


def cmd_train_ip_adapter(args) -> int:
    from ldmkit.training.ip_adapter import IPAdapterTask, IPAdapterTrainConfig

    return _train(args, IPAdapterTrainConfig, IPAdapterTask, lambda c: f"{c.name}.safetensors")


def cmd_train_video(args) -> int:
    from ldmkit.training.video_ldm import VideoLDMTask, VideoLDMTrainConfig

    return _train(args, VideoLDMTrainConfig, VideoLDMTask, "video.safetensors")


def cmd_train_text_encoder(args) -> int:
    from ldmkit.training.text_tower import TextTowerTask, TextTowerTrainConfig

    return _train(args, TextTowerTrainConfig, TextTowerTask, "model.safetensors")


def add_parsers(sub) -> None:
    for name, func, text in [
        ("train-autoencoder", cmd_train_autoencoder, "stage 1: train a KL autoencoder"),
        ("train", cmd_train, "stage 2: train a text-conditioned latent diffusion model"),
        (
            "train-controlnet",
            cmd_train_controlnet,
            "train a ControlNet for a frozen model (hints made from the images)",
        ),
        ("distill-lcm", cmd_distill_lcm, "latent consistency distillation: a few-step student of a model"),
        ("train-lora", cmd_train_lora, "train a LoRA for a frozen model (saved in the kohya and diffusers layouts)"),
        ("train-embedding", cmd_train_embedding, "textual inversion: train a new word's vectors for a frozen model"),
        (
            "train-image-encoder",
            cmd_train_image_encoder,
            "a small CLIP vision tower, contrastive against a model's text encoder (for image prompts)",
        ),
        ("train-ip-adapter", cmd_train_ip_adapter, "train an IP-Adapter (image prompts) for a frozen model"),
        (
            "train-text-encoder",
            cmd_train_text_encoder,
            "teach a model's MiniLM tower that a caption's wordings are one (its states, the canonical wording's)",
        ),
        ("train-video", cmd_train_video, "text-to-video: temporal layers trained into a text-to-image model"),
        (
            "distill-tiny-autoencoder",
            cmd_distill_tiny,
            "a tiny autoencoder (TAESD architecture) distilled from a model's autoencoder: fast previews and decodes",
        ),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="YAML file (see configs/)")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        if name == "train":
            p.add_argument("--init-from", help="fine-tune this model (SD 1.x/2.x file, diffusers folder, or ours)")
        p.add_argument("--run-dir", help="override run.dir")
        p.add_argument("--threads", type=int, help="override run.threads (CPU threads of each process)")
        p.add_argument("--steps", type=int, help="override run.steps (with --resume: a finished run goes on)")
        p.add_argument("-q", "--quiet", action="store_true")
        p.set_defaults(func=func)
