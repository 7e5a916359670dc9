"""`UnCLIPPipeline`: text -> CLIP z_t -> prior z_i (best of n) -> decoder 64 px -> upsamplers.

A pipeline directory holds `pipeline.json` (format name + version, and per stage its class path,
plain hyperparameters and weight file) and one `.safetensors` file per stage: no pickle anywhere.
Only the project's own stage classes may be named (a pipeline file cannot import arbitrary code).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from modules.cli import UserError
from modules.conditioning import trim_tokens
from modules.diffusion.config import SamplingConfig
from modules.networks.clip import FrozenCLIP, read_state_dict
from modules.safe_load import CheckpointReadError, read_lightning_checkpoint

FORMAT, VERSION = "unclip-pipeline", 1
STAGE_CLASSES = {
    "prior": ("modules.prior_module.PriorModule", "modules.ar_prior_module.ARPriorModule"),
    "decoder": ("modules.decoder_module.DecoderModule",),
    "upsampler": ("modules.superres_module.SuperResModule",),
}


class PipelineError(UserError, ValueError):
    """A pipeline directory that cannot be loaded (one line naming the file and field)."""


class PriorMode(str, Enum):
    """Where the decoder's image embedding comes from."""

    PRIOR = "prior"  # sampled by the prior (the paper)
    TEXT = "text"  # z_t fed to the decoder directly ("no prior" ablation)


@dataclass
class GenerateConfig:
    """Knobs of `UnCLIPPipeline.generate` (None: the stage's own sampling config)."""

    prior_mode: PriorMode = PriorMode.PRIOR
    num_candidates: int = 2
    prior_sampling: SamplingConfig | None = None
    decoder_sampling: SamplingConfig | None = None
    upsampler_sampling: list[SamplingConfig | None] = field(default_factory=list)
    upsample: bool = True  # False: stop at the decoder's resolution
    batch_size: int = 16


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _stage_class(kind: str, class_path: str, where: str) -> type:
    if class_path not in STAGE_CLASSES[kind]:
        raise PipelineError(f"{where}: class {class_path!r} is not an allowed {kind} stage ({', '.join(STAGE_CLASSES[kind])})")
    return _import(class_path)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def load_stage_checkpoint(kind: str, path: str | Path, class_path: str) -> nn.Module:
    """A stage module from a Lightning checkpoint, loaded with `weights_only=True` (EMA weights
    when the run used `EMAWeightAveraging`, which stores the average as `state_dict`)."""
    try:
        ckpt = read_lightning_checkpoint(path, f"{kind} checkpoint")
    except CheckpointReadError as exc:
        raise PipelineError(str(exc)) from None
    module = _stage_class(kind, class_path, str(path))(**ckpt.get("hyper_parameters", {}))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


class UnCLIPPipeline(nn.Module):
    """The unCLIP cascade assembled from trained stages (all frozen, eval mode)."""

    def __init__(self, clip: FrozenCLIP, decoder: nn.Module, prior: nn.Module | None = None,
                 upsamplers: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.clip, self.prior, self.decoder = clip, prior, decoder
        self.upsamplers = nn.ModuleList(upsamplers or [])
        self.tokenizer = open_clip.get_tokenizer(clip.model_name)
        self.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, clip_model: str, clip_weights: str | None, decoder: str, prior: str | None = None,
                         upsamplers: list[str] | None = None,
                         prior_class: str = "modules.prior_module.PriorModule") -> UnCLIPPipeline:
        return cls(
            FrozenCLIP(clip_model, clip_weights),
            load_stage_checkpoint("decoder", decoder, STAGE_CLASSES["decoder"][0]),
            load_stage_checkpoint("prior", prior, prior_class) if prior else None,
            [load_stage_checkpoint("upsampler", p, STAGE_CLASSES["upsampler"][0]) for p in upsamplers or []],
        )

    def save(self, directory: str | Path) -> Path:
        """Write the pipeline directory atomically (a crash never leaves a half-written one)."""
        with atomic_directory(directory) as tmp:
            spec: dict[str, Any] = {"format": FORMAT, "version": VERSION}
            spec["clip"] = {"model_name": self.clip.model_name, "weights": "clip.safetensors"}
            _save_weights(self.clip.model, tmp / "clip.safetensors")
            stages = [("decoder", self.decoder)] + ([("prior", self.prior)] if self.prior is not None else [])
            for kind, module in stages:
                spec[kind] = save_stage(module, tmp, kind)
            spec["upsamplers"] = [save_stage(m, tmp, f"upsampler{i}") for i, m in enumerate(self.upsamplers)]
            (tmp / "pipeline.json").write_text(json.dumps(spec, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> UnCLIPPipeline:
        directory = Path(directory)
        spec, spec_path = read_spec(directory, FORMAT, VERSION, required=("clip", "decoder"))
        clip = FrozenCLIP(spec["clip"]["model_name"])
        clip.model.load_state_dict(read_state_dict(directory / spec["clip"]["weights"]))
        prior = load_stage("prior", spec["prior"], directory, spec_path) if spec.get("prior") else None
        ups = [load_stage("upsampler", e, directory, spec_path) for e in spec.get("upsamplers", [])]
        return cls(clip, load_stage("decoder", spec["decoder"], directory, spec_path), prior, ups).to(device)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """CLIP text conditioning: z_t (B, D), token encodings (B, L, W) trimmed, mask (B, L)."""
        text = self.clip.encode_text(self.tokenizer(prompts).to(self.device))
        tokens, mask = trim_tokens(text.tokens, text.mask)
        return {"text_embed": text.embed, "text_tokens": tokens, "text_mask": mask}

    @torch.no_grad()
    def image_embeddings(self, text: dict[str, Tensor], cfg: GenerateConfig, generator: torch.Generator | None) -> Tensor:
        """z_i for each prompt: sampled by the prior, or z_t itself for the no-prior ablation."""
        if cfg.prior_mode is PriorMode.TEXT or self.prior is None:
            return text["text_embed"]
        return self.prior.generate(text, num_candidates=cfg.num_candidates, sampling=cfg.prior_sampling, generator=generator)

    @torch.no_grad()
    def decode(self, text: dict[str, Tensor], image_embed: Tensor, cfg: GenerateConfig,
               generator: torch.Generator | None, x_T: Tensor | None = None) -> Tensor:
        """Decoder then upsamplers: images (B, 3, S, S) in [-1, 1] at the final resolution."""
        kwargs = self.decoder_kwargs(text, image_embed)
        x = self.decoder.generate(kwargs, sampling=cfg.decoder_sampling, generator=generator, x_T=x_T)
        for i, up in enumerate(self.upsamplers if cfg.upsample else []):
            sampling = cfg.upsampler_sampling[i] if i < len(cfg.upsampler_sampling) else None
            x = up.generate(x, sampling=sampling, generator=generator)
        return x

    def decoder_kwargs(self, text: dict[str, Tensor] | None, image_embed: Tensor) -> dict[str, Tensor]:
        """U-Net kwargs; `text=None` conditions on the image embedding alone (caption dropped)."""
        if text is not None:
            return self.decoder.unet_kwargs({**text, "image_embed": image_embed}, drop=False)
        text = self.encode_text([" "] * image_embed.shape[0])
        kwargs = self.decoder.unet_kwargs({**text, "image_embed": image_embed}, drop=False)
        if "drop_text" in kwargs:
            kwargs["drop_text"] = torch.ones_like(kwargs["drop_text"])
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: list[str], num_images: int = 1, *, seed: int = 0,
                 config: GenerateConfig | None = None) -> Tensor:
        """(len(prompts) * num_images, 3, S, S) in [0, 1], prompt-major order, seeded."""
        cfg = config or GenerateConfig()
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        expanded = [p for p in prompts for _ in range(num_images)]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = []
        for start in range(0, len(expanded), cfg.batch_size):
            chunk = expanded[start : start + cfg.batch_size]
            text = self.encode_text(chunk)
            z_i = self.image_embeddings(text, cfg, generator)
            out.append(self.decode(text, z_i, cfg, generator))
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)


# -- pipeline directories (shared with `modules.imagen_pipeline`) -------------------------------
@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh folder beside `directory`; when the block succeeds it replaces `directory`
    with `os.replace`, so readers see the old or the new pipeline, never half of one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def save_stage(module: nn.Module, directory: Path, name: str) -> dict[str, Any]:
    """Write `name.safetensors`; returns the stage's `pipeline.json` entry."""
    _save_weights(module, directory / f"{name}.safetensors")
    return {"class_path": _class_path(module), "hparams": dict(module.hparams), "weights": f"{name}.safetensors"}


def read_spec(directory: Path, fmt: str, version: int, required: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """`pipeline.json` of `directory`, checked for format, version and required fields."""
    spec_path = directory / "pipeline.json"
    if not spec_path.is_file():
        raise PipelineError(f"not a pipeline directory (no pipeline.json): {directory}")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{spec_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if spec.get("format") != fmt or spec.get("version") != version:
        raise PipelineError(f"{spec_path}: field 'format'/'version' is {spec.get('format')!r}/{spec.get('version')!r}, expected {fmt!r}/{version}")
    for key in required:
        if key not in spec:
            raise PipelineError(f"{spec_path}: missing field {key!r}")
    return spec, spec_path


def load_stage(kind: str, entry: dict[str, Any], directory: Path, spec_path: Path) -> nn.Module:
    """An allow-listed stage class built from its plain hparams, weights from safetensors."""
    module = _stage_class(kind, entry["class_path"], str(spec_path))(**entry["hparams"])
    weights = directory / entry["weights"]
    if not weights.is_file():
        raise PipelineError(f"{spec_path}: weights file {entry['weights']!r} is missing")
    module.load_state_dict(load_file(str(weights)))
    return module


def _save_weights(module: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))


class PipelineGenerator:
    """`unclip evaluate`'s image source over a pipeline: text -> prior -> decoder -> upsamplers."""

    name = "unclip-pipeline"

    def __init__(self, pipe: UnCLIPPipeline, config: GenerateConfig | None = None) -> None:
        self.pipe, self.config, self.clip = pipe, config or GenerateConfig(), pipe.clip
        self.clip_weights: str | None = None
        self.sampling = self.config.decoder_sampling or pipe.decoder.sampling
        last = pipe.upsamplers[-1] if len(pipe.upsamplers) else pipe.decoder
        self.image_size = int(last.unet.config.image_size)

    def generate(self, captions: list[str], *, batch: dict[str, Any] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return self.pipe.generate(captions, 1, seed=seed, config=self.config)


def load_pipeline(directory: str | Path, device: str | torch.device = "cpu") -> PipelineGenerator:
    gen = PipelineGenerator(UnCLIPPipeline.load(directory, device))
    gen.clip_weights = str(Path(directory) / "clip.safetensors")  # named in the report's feature notes
    return gen
