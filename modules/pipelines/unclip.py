"""`UnCLIPPipeline`: text -> CLIP z_t -> prior z_i (best of n) -> decoder 64 px (best of n) -> upsamplers.

With a layout stage (`modules.stages.layout`) and a layout-conditioned decoder, the caption's
object phrases are first placed in boxes, and the decoder draws in that plan.

A pipeline directory holds `pipeline.json` (format name + version, and per stage its class path,
plain hyperparameters and weight file) and one `.safetensors` file per stage: no pickle anywhere.
Only the project's own stage classes may be named (a pipeline file cannot import arbitrary code).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from modules.core.draws import key_seed
from modules.core.errors import PipelineError
from modules.core.images import to_unit
from modules.diffusion.config import SamplingConfig
from modules.networks.clip import FrozenCLIP, read_state_dict
from modules.pipelines.store import (
    atomic_directory,
    contained_file,
    first_line,
    load_stage,
    load_stage_checkpoint,
    read_spec,
    save_stage,
    save_weights,
    upsampler_entries,
)
from modules.stages.conditioning import best_of, clip_dims, finish_condition, repeat_rows
from modules.stages.layout import LayoutModule
from modules.stages.protocols import DecoderStage, PriorStage, UpsamplerStage
from modules.stages.registry import STAGE_CLASSES, StageKind

FORMAT, VERSION = "unclip-pipeline", 1


class PriorMode(str, Enum):
    """Where the decoder's image embedding comes from."""

    PRIOR = "prior"  # sampled by the prior (the paper)
    TEXT = "text"  # z_t fed to the decoder directly ("no prior" ablation)
    # No image embedding: the decoder's learned null z_i (its CFG dropout's), so it draws from the caption (and
    # plan) alone; the first of the paper's three conditionings of one decoder (Ramesh et al. 2022 §5.1, Fig. 7)
    CAPTION = "caption"


@dataclass
class GenerateConfig:
    """Knobs of `UnCLIPPipeline.generate` (None: the stage's own sampling config)."""

    prior_mode: PriorMode = PriorMode.PRIOR
    num_candidates: int | None = None  # the prior's best-of-n over z_i (paper §2.2: 2); None: the prior's own
    # Decoder samples per prompt; n > 1 keeps the one whose CLIP image embedding has the largest dot
    # product with z_t (CLIP reranking, as DALL·E (Ramesh et al. 2021) reranks its samples), before upsampling.
    decoder_candidates: int = 1
    prior_sampling: SamplingConfig | None = None
    decoder_sampling: SamplingConfig | None = None
    upsampler_sampling: list[SamplingConfig | None] = field(default_factory=list)
    upsample: bool = True  # False: stop at the decoder's resolution
    use_layout: bool = True  # False: no layout plan even when the pipeline has a layout stage (ablation)
    layout_tries: int | None = None  # plans drawn per prompt until one follows the layout rule; None: the stage's own
    batch_size: int = 16


def load_clip_entry(entry: Any, directory: Path, spec_path: Path) -> FrozenCLIP:
    """The pipeline's frozen CLIP: a registered open_clip name and a weight file inside the folder."""
    if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str) or not isinstance(entry.get("weights"), str):
        raise PipelineError(f"{spec_path}: clip: expected an object with string fields model_name and weights")
    weights = contained_file(directory, entry["weights"], f"{spec_path}: clip.weights")
    try:
        clip_dims(entry["model_name"])
    except ValueError:
        raise PipelineError(f"{spec_path}: clip.model_name: unknown CLIP model {entry['model_name']!r}") from None
    clip = FrozenCLIP(entry["model_name"])
    try:
        clip.model.load_state_dict(read_state_dict(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"{spec_path}: clip.weights: {entry['weights']!r} does not hold {entry['model_name']} weights "
                            f"({first_line(exc)})") from None
    return clip


def check_same_clip(clip_model: str, stages: dict[str, Any]) -> None:
    """Every stage that reads CLIP embeddings was trained against the pipeline's CLIP: a prior or
    decoder of another CLIP (other widths, or the same widths in another space) is refused."""
    for kind, stage in stages.items():
        trained = (getattr(stage, "hparams", None) or {}).get("clip_model") if stage is not None else None
        if trained is not None and trained != clip_model and stage.hparams.get("text_encoder") is None:
            raise PipelineError(f"{kind}: trained against CLIP {trained!r}, but the pipeline's CLIP is {clip_model!r}; "
                                "every stage must use the same CLIP")


class UnCLIPPipeline(nn.Module):
    """The unCLIP cascade assembled from trained stages (all frozen, eval mode)."""

    prior: PriorStage | None
    decoder: DecoderStage

    def __init__(self, clip: FrozenCLIP, decoder: DecoderStage, prior: PriorStage | None = None,
                 upsamplers: list[UpsamplerStage] | None = None, layout: LayoutModule | None = None) -> None:
        super().__init__()
        check_same_clip(clip.model_name, {"decoder": decoder, "prior": prior, "layout": layout})
        if layout is not None and not getattr(decoder, "hparams", {}).get("condition_on_layout"):
            raise PipelineError("layout: the decoder was not trained with layouts (condition_on_layout)")
        self.clip, self.prior, self.decoder, self.layout = clip, prior, decoder, layout
        self._phrases: dict[str, Tensor] = {}
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
                         prior_class: str = "modules.stages.prior.PriorModule", layout: str | None = None) -> UnCLIPPipeline:
        return cls(
            FrozenCLIP(clip_model, clip_weights),
            load_stage_checkpoint(StageKind.DECODER, decoder, STAGE_CLASSES[StageKind.DECODER][0]),
            load_stage_checkpoint(StageKind.PRIOR, prior, prior_class) if prior else None,
            [load_stage_checkpoint(StageKind.UPSAMPLER, p, STAGE_CLASSES[StageKind.UPSAMPLER][0]) for p in upsamplers or []],
            load_stage_checkpoint(StageKind.LAYOUT, layout, STAGE_CLASSES[StageKind.LAYOUT][0]) if layout else None,
        )

    def save(self, directory: str | Path) -> Path:
        """Write the pipeline directory atomically (a crash never leaves a half-written one)."""
        with atomic_directory(directory) as tmp:
            spec: dict[str, Any] = {"format": FORMAT, "version": VERSION}
            spec["clip"] = {"model_name": self.clip.model_name, "weights": "clip.safetensors"}
            save_weights(self.clip.model, tmp / "clip.safetensors")
            stages = [("decoder", self.decoder)] + ([("prior", self.prior)] if self.prior is not None else [])
            stages += [("layout", self.layout)] if self.layout is not None else []
            for kind, module in stages:
                spec[kind] = save_stage(module, tmp, kind)
            spec["upsamplers"] = [save_stage(m, tmp, f"upsampler{i}") for i, m in enumerate(self.upsamplers)]
            (tmp / "pipeline.json").write_text(json.dumps(spec, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> UnCLIPPipeline:
        directory = Path(directory)
        spec, spec_path = read_spec(directory, FORMAT, VERSION, required=("clip", "decoder"))
        clip = load_clip_entry(spec["clip"], directory, spec_path)
        prior = load_stage(StageKind.PRIOR, spec["prior"], directory, spec_path) if spec.get("prior") else None
        ups = [load_stage(StageKind.UPSAMPLER, e, directory, spec_path) for e in upsampler_entries(spec, spec_path)]
        layout = load_stage(StageKind.LAYOUT, spec["layout"], directory, spec_path) if spec.get("layout") else None
        return cls(clip, load_stage(StageKind.DECODER, spec["decoder"], directory, spec_path), prior, ups, layout).to(device)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """CLIP text conditioning: z_t (B, D), token encodings (B, L, W) trimmed, mask (B, L), and
        the token ids (B, L) for a decoder that embeds them itself."""
        ids = self.tokenizer(prompts).to(self.device)
        text = self.clip.encode_text(ids)
        return finish_condition({"text_embed": text.embed, "text_tokens": text.tokens, "text_mask": text.mask}, ids)

    @torch.no_grad()
    def image_embeddings(self, text: dict[str, Tensor], cfg: GenerateConfig, generator: torch.Generator | None) -> Tensor:
        """z_i for each prompt: sampled by the prior, or z_t itself for the no-prior ablation (and as the
        placeholder the caption-only arm masks, `decode`)."""
        if cfg.prior_mode is not PriorMode.PRIOR or self.prior is None:
            return text["text_embed"]
        return self.prior.generate(text, num_candidates=cfg.num_candidates, sampling=cfg.prior_sampling, generator=generator)

    def prior_sampling(self, **overrides: Any) -> SamplingConfig | None:
        """The prior's own sampling with `overrides` (SamplingConfig fields), for
        `GenerateConfig.prior_sampling`; None without a prior or overrides. The diffusion prior samples
        per its SamplingConfig; the AR prior has none and reads only `guidance_scale` (its other knobs
        are its own hparams), so it gets the overrides on a default one."""
        if self.prior is None or not overrides:
            return None
        return dataclasses.replace(getattr(self.prior, "sampling", None) or SamplingConfig(), **overrides)

    @torch.no_grad()
    def plan_layout(self, prompts: list[str], generator: torch.Generator | None,
                    tries: int | None = None) -> dict[str, Tensor]:
        """The layout stage's plan for each prompt: its object phrases (embedded by the pipeline's CLIP)
        in boxes sampled for them and their relation, as decoder kwargs `layout_boxes` (B, K, 4), `layout_embeds`,
        `layout_mask`; `tries`: draws per prompt until the plan follows the layout rule (None: the stage's own)."""
        if self.layout is None:
            raise PipelineError("this pipeline has no layout stage")
        return self.layout.plan(prompts, clip=self.clip, tokenizer=self.tokenizer, generator=generator,
                                cache=self._phrases, tries=tries)

    @torch.no_grad()
    def decode(self, text: dict[str, Tensor], image_embed: Tensor, cfg: GenerateConfig,
               generator: torch.Generator | None, x_T: Tensor | None = None,
               layout: dict[str, Tensor] | None = None) -> Tensor:
        """Decoder (best of `cfg.decoder_candidates` by CLIP score) then upsamplers: images (B, 3, S, S)
        in [-1, 1] at the final resolution; `layout`: a plan from `plan_layout` (None: none)."""
        kwargs, n = self.decoder_kwargs(text, image_embed, layout), cfg.decoder_candidates
        if cfg.prior_mode is PriorMode.CAPTION and "drop_image" in kwargs:
            kwargs["drop_image"] = torch.ones_like(kwargs["drop_image"])  # the null z_i in every pass
        if n < 1 or (n > 1 and x_T is not None):
            raise ValueError(f"decoder_candidates must be >= 1, and 1 when x_T is given; got {n}")
        if n > 1:
            kwargs = repeat_rows(kwargs, n)
        x = self.decoder.generate(kwargs, sampling=cfg.decoder_sampling, generator=generator, x_T=x_T)
        if n > 1:
            x = x.view(-1, n, *x.shape[1:])  # (B, n, 3, S, S)
            keys = self.clip.encode_image(x.flatten(0, 1)).view(x.shape[0], n, -1)  # CLIP(x), unit-norm
            x = x[torch.arange(x.shape[0], device=x.device), best_of(keys, text["text_embed"])]
        for i, up in enumerate(self.upsamplers if cfg.upsample else []):
            sampling = cfg.upsampler_sampling[i] if i < len(cfg.upsampler_sampling) else None
            x = up.generate(x, sampling=sampling, generator=generator)
        return x

    def decoder_kwargs(self, text: dict[str, Tensor] | None, image_embed: Tensor,
                       layout: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """U-Net kwargs; `text=None` conditions on the image embedding alone (caption dropped)."""
        if text is not None:
            return self.decoder.unet_kwargs({**text, "image_embed": image_embed, **(layout or {})}, drop=False)
        text = self.encode_text([" "] * image_embed.shape[0])
        kwargs = self.decoder.unet_kwargs({**text, "image_embed": image_embed}, drop=False)
        if "drop_text" in kwargs:
            kwargs["drop_text"] = torch.ones_like(kwargs["drop_text"])
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: list[str], num_images: int = 1, *, seed: int = 0,
                 config: GenerateConfig | None = None) -> Tensor:
        """(len(prompts) * num_images, 3, S, S) in [0, 1], prompt-major order, seeded.

        The prior, the layout stage and the decoder (with its upsamplers) each draw from their own
        generator keyed by (seed, stage), so an ablation of one stage (no prior, another best-of-n,
        no plan) meets the same noise everywhere else: common random numbers, paired comparisons."""
        cfg = config or GenerateConfig()
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        expanded = [p for p in prompts for _ in range(num_images)]
        gens = {stage: torch.Generator(device="cpu").manual_seed(key_seed("generate", seed, stage))
                for stage in ("prior", "layout", "decoder")}
        out = []
        for start in range(0, len(expanded), cfg.batch_size):
            chunk = expanded[start : start + cfg.batch_size]
            text = self.encode_text(chunk)
            z_i = self.image_embeddings(text, cfg, gens["prior"])
            layout = (self.plan_layout(chunk, gens["layout"], cfg.layout_tries)
                      if cfg.use_layout and self.layout is not None else None)
            out.append(self.decode(text, z_i, cfg, gens["decoder"], layout=layout))
        return to_unit(torch.cat(out))


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
