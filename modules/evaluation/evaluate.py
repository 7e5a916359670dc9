"""`unclip evaluate`: sample from a stage checkpoint (or a pipeline directory), score FID / KID /
IS / CLIP score, and write `report.json` plus a self-contained `report.html` (relative image paths,
no external resources: opens offline).

Generation goes through the small `ImageGenerator` protocol, so the end-to-end pipeline plugs in
with a one-class adapter:

    generate(captions, *, batch=None, generator=None) -> images (B, 3, H, W) in [0, 1]

`DecoderGenerator` adapts a `DecoderModule` checkpoint: the decoder given the *true* CLIP image
embeddings of the validation images ("decoder given true latents"). Checkpoints are read with
`torch.load(weights_only=True)` only. Deterministic for a fixed `--seed`: batch i samples with a
generator seeded `seed + i`; KID/IS subset draws are seeded too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from modules.core.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from modules.stages.decoder import DecoderModule

log = logging.getLogger(__name__)
REPORT_SCHEMA = "unclip-evaluate/1"


class ImageGenerator(Protocol):
    """What `unclip evaluate` samples from."""

    name: str  # shown in the report
    image_size: int

    def generate(self, captions: list[str], *, batch: dict[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] for B = len(captions); `batch` holds the matching real samples."""
        ...


class DecoderGenerator:
    """A `DecoderModule` conditioned on the CLIP image embeddings of the real images in `batch`."""

    def __init__(self, module: DecoderModule, sampling: Any = None) -> None:
        import open_clip

        self.module = module.eval()
        self.sampling = sampling or module.sampling
        self.image_size = module.unet.config.image_size
        self.needs_images = bool(module.hparams.condition_on_image)
        self.name = "decoder given true CLIP image embeddings" if self.needs_images else "decoder (text conditioning only)"
        self.tokenizer = open_clip.get_tokenizer(module.hparams.clip_model)
        self.clip_weights = module.hparams.clip_weights  # for the report

    @property
    def clip(self) -> Any:
        """The frozen CLIP the decoder conditions on (reused for the CLIP score / FID_CLIP)."""
        return self.module.conditioner.encoder(self.module.device)

    def generate(self, captions: list[str], *, batch: dict[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
        from modules.core.images import to_unit

        if self.needs_images and batch is None:
            raise UserError("the decoder alone needs true image embeddings: evaluate it on --val-shards (or use --pipeline)")
        device = self.module.device
        cond_batch: dict[str, Any] = {"tokens": self.tokenizer(list(captions)).to(device)}
        if self.needs_images:
            cond_batch["image"] = batch["image"][: len(captions)].to(device)
        cond = self.module.condition(cond_batch, drop=False)
        return to_unit(self.module.generate(cond, sampling=self.sampling, generator=generator))


# -- loading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint through `torch.load(weights_only=True)` (no arbitrary pickle)."""
    from modules.core.safe_load import read_lightning_checkpoint

    ckpt = read_lightning_checkpoint(path)
    if "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a Lightning stage checkpoint (no hyper_parameters)")
    return ckpt


def check_decoder_checkpoint(ckpt: dict[str, Any], path: str) -> None:
    """`--checkpoint` evaluates a decoder alone (given true image embeddings); the other stages
    are evaluated through the images of a `--pipeline`."""
    from modules.stages.registry import StageKind, stage_kind

    class_path = ckpt["hyper_parameters"].get("_class_path")
    if class_path is not None and stage_kind(class_path) is not StageKind.DECODER:
        raise UserError(f"{path}: --checkpoint takes a decoder checkpoint, this one holds {class_path}; "
                        "evaluate other stages through a --pipeline")


def decoder_from_checkpoint(ckpt: dict[str, Any], cfg: EvalConfig) -> DecoderGenerator:
    import dataclasses

    from modules.stages.decoder import DecoderModule

    from modules.stages.registry import init_kwargs

    module = DecoderModule(**init_kwargs(ckpt["hyper_parameters"]))
    module.load_state_dict(ckpt["state_dict"])  # EMA weights when trained with EMAWeightAveraging
    sampling = module.sampling
    if cfg.steps is not None:
        sampling = dataclasses.replace(sampling, steps=cfg.steps)
    if cfg.guidance_scale is not None:
        sampling = dataclasses.replace(sampling, guidance_scale=cfg.guidance_scale)
    return DecoderGenerator(module.to(cfg.device), sampling)



def load_generator(cfg: EvalConfig) -> tuple[ImageGenerator, dict[str, Any]]:
    """The generator and what the report says about its source."""
    if cfg.pipeline:
        from modules.pipelines.unclip import load_pipeline

        return load_pipeline(cfg.pipeline, cfg.device), {"pipeline": cfg.pipeline, "checkpoint": None, "stage": "pipeline"}
    if not cfg.checkpoint:
        raise UserError("give --checkpoint or --pipeline")
    ckpt = load_checkpoint(cfg.checkpoint)
    check_decoder_checkpoint(ckpt, cfg.checkpoint)
    gen = decoder_from_checkpoint(ckpt, cfg)
    return gen, {"pipeline": None, "checkpoint": str(cfg.checkpoint), "stage": "decoder", "global_step": ckpt.get("global_step")}


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    out: str
    checkpoint: str | None = None
    pipeline: str | None = None
    prompts: str | None = None
    val_shards: str | None = None
    class_prompts: str | None = None
    num_samples: int = 64
    batch_size: int = 16
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    inception_weights: str | None = None
    clip_model: str | None = None
    clip_weights: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    isc_splits: int = 10
    show: int = 16
    device: str = "auto"
    wandb: bool = False


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines that are not `#` comments."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def eval_batches(cfg: EvalConfig, image_size: int) -> list[tuple[list[str], dict[str, Any] | None]]:
    """(captions, real batch or None) chunks totalling at most `num_samples`.

    Captions come from `--prompts` (cycled) when given, else from the validation samples.
    """
    prompts = read_lines(cfg.prompts) if cfg.prompts else None
    if prompts is not None and not prompts:
        raise UserError(f"{cfg.prompts}: no prompts")
    out: list[tuple[list[str], dict[str, Any] | None]] = []
    if not cfg.val_shards:
        if prompts is None:
            raise UserError("give --val-shards (real images and captions) and/or --prompts")
        cycled = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]
        return [(cycled[i : i + cfg.batch_size], None) for i in range(0, cfg.num_samples, cfg.batch_size)]
    from datamodules.image_text import ImageTextDataModule, LoaderConfig

    dm = ImageTextDataModule(cfg.val_shards, cfg.val_shards, image_size=image_size, val_samples=cfg.num_samples, tokenizer=None, loader=LoaderConfig(batch_size=cfg.batch_size, num_workers=0))  # fmt: skip
    dm.setup("validate")
    done = 0
    for batch in dm.val_dataloader():
        n = min(len(batch["caption"]), cfg.num_samples - done)
        if n <= 0:
            break
        real = {"image": batch["image"][:n], "caption": list(batch["caption"][:n])}
        captions = [prompts[(done + i) % len(prompts)] for i in range(n)] if prompts else real["caption"]
        out.append((captions, real))
        done += n
    if not out:
        raise UserError(f"no validation samples in {cfg.val_shards}")
    return out


# -- the run ---------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Generate, score, write `report.json` / `report.html` under `cfg.out`; returns the report."""
    import numpy as np
    import torch

    from modules.core.images import save_png, tile
    from modules.evaluation.report_html import render_html
    from modules.core.hparams import to_plain

    t0 = time.perf_counter()
    cfg.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    torch.manual_seed(cfg.seed)  # any randomly initialised network (e.g. a CLIP without weights) is reproducible
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    gen, source = load_generator(cfg)
    batches = eval_batches(cfg, gen.image_size)
    class_prompts = read_lines(cfg.class_prompts) if cfg.class_prompts else sorted({c for caps, _ in batches for c in caps})
    metrics = build_eval_metrics(cfg, gen, class_prompts)
    t1 = time.perf_counter()
    shapes = ShapesScorer()
    shown, fakes, reals = sample_and_score(cfg, gen, batches, metrics, out, shapes)
    t2 = time.perf_counter()
    values = metrics.compute(seed=cfg.seed)
    t3 = time.perf_counter()

    nrow = max(1, int(len(fakes) ** 0.5 + 0.999))
    grids = {}
    if fakes:
        grids["samples_grid"] = save_png(tile(torch.stack(fakes), nrow), out / "images" / "samples_grid.png")
    if reals:
        grids["real_grid"] = save_png(tile(torch.stack(reals), nrow), out / "images" / "real_grid.png")
    extractor = metrics.extractor
    report = {
        "schema": REPORT_SCHEMA,
        "source": {**source, "generator": gen.name},
        "data": {
            "prompts": cfg.prompts, "val_shards": cfg.val_shards, "num_samples": cfg.num_samples,
            "num_generated": values.pop("num_generated"), "num_real": values.pop("num_real"), "image_size": gen.image_size,
        },  # fmt: skip
        "settings": {"seed": cfg.seed, "batch_size": cfg.batch_size, "device": cfg.device, "sampling": to_plain(getattr(gen, "sampling", None))},
        "feature_extractor": {"source": extractor.source.value, "description": extractor.description, "dim": extractor.feature_dim},
        "metrics": values,
        "shapes_accuracy": shapes.table(),  # null unless every prompt is a shapes caption
        "metric_notes": metric_notes(extractor.source.value, len(class_prompts)),
        "images": {**{k: p.relative_to(out).as_posix() for k, p in grids.items()}, "samples": shown},
        "timing": {"generation_s": round(t2 - t1, 3), "metrics_s": round(t3 - t2, 3), "total_s": round(time.perf_counter() - t0, 3)},
        "html": "report.html",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report))
    if cfg.wandb:
        log_to_wandb(report, out)
    return report


def build_eval_metrics(cfg: EvalConfig, gen: ImageGenerator, class_prompts: list[str]) -> Any:
    """FidelityMetrics on `cfg.device`; CLIP = `--clip-model` if given, else the generator's own CLIP."""
    from callbacks.feature_extractors import FeatureConfig, build_extractor
    from callbacks.generation_metrics import FidelityMetrics
    from modules.networks.clip import FrozenCLIP

    clip = getattr(gen, "clip", None) if cfg.clip_model is None else None
    if clip is not None:
        feat_cfg = FeatureConfig(cfg.inception_weights, clip.model_name, getattr(gen, "clip_weights", None))
    else:
        feat_cfg = FeatureConfig(cfg.inception_weights, cfg.clip_model or "tiny-vit", cfg.clip_weights)
        clip = FrozenCLIP(feat_cfg.clip_model, feat_cfg.clip_weights)
    clip = clip.to(cfg.device)
    extractor = build_extractor(feat_cfg, key="--inception-weights", clip=clip, class_prompts=class_prompts)
    kwargs = dict(kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, isc_splits=cfg.isc_splits)
    return FidelityMetrics(extractor, clip=clip, **kwargs).to(cfg.device)


def sample_and_score(
    cfg: EvalConfig, gen: ImageGenerator, batches: list[tuple[list[str], dict[str, Any] | None]], metrics: Any, out: Path,
    shapes: ShapesScorer,
) -> tuple[list[dict[str, str]], list[Tensor], list[Tensor]]:
    """Generate every batch (generator seeded `seed + i`), update the metrics, save the first
    `cfg.show` samples; returns (shown samples, their images, the matching real images)."""
    import torch
    from tqdm.auto import tqdm

    from modules.core.images import save_png, to_unit

    shown: list[dict[str, str]] = []
    fakes: list[Tensor] = []
    reals: list[Tensor] = []
    for i, (captions, batch) in enumerate(tqdm(batches, desc="evaluate: sampling", leave=False)):
        images = gen.generate(captions, batch=batch, generator=torch.Generator(device="cpu").manual_seed(cfg.seed + i))
        shapes.update(images, captions)
        real = to_unit(batch["image"].to(cfg.device)) if batch is not None else None
        metrics.update(fake=images, real=real, captions=captions)
        for k in range(min(images.shape[0], cfg.show - len(shown))):
            path = save_png(images[k], out / "images" / f"sample_{len(shown):05d}.png")
            shown.append({"path": path.relative_to(out).as_posix(), "caption": captions[k]})
            fakes.append(images[k].cpu())
            if real is not None:
                reals.append(real[k].cpu())
    return shown, fakes, reals


class ShapesScorer:
    """Compositional accuracy (modules.evaluation.shapes_evaluator) when every prompt is a shapes caption."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] | None = []

    def update(self, images: Tensor, captions: list[str]) -> None:
        from modules.evaluation.shapes_evaluator import evaluate_image

        if self.rows is None:
            return
        try:
            self.rows += [evaluate_image(img, cap) for img, cap in zip(images.cpu(), captions)]
        except ValueError:  # a caption outside the shapes grammar: not a shapes evaluation
            self.rows = None

    def table(self) -> dict[str, Any] | None:
        from modules.evaluation.shapes_evaluator import accuracy_table

        return accuracy_table(self.rows) if self.rows else None


def metric_notes(source: str, num_classes: int) -> dict[str, str]:
    clip = source == "clip"
    feats = "CLIP image embeddings (FID_CLIP: not comparable with Inception FID)" if clip else "Inception-v3 pool3 features"
    return {
        "fid": f"Frechet distance between Gaussian fits of {feats}, generated vs real; lower is better",
        "kid": f"unbiased MMD^2, cubic polynomial kernel on {feats}, mean/std over subsets; lower is better",
        "inception_score": (
            f"exp E KL(p(y|x) || p(y)) on generated images, p(y|x) = CLIP zero-shot softmax over {num_classes} prompts"
            if clip else "exp E KL(p(y|x) || p(y)) on generated images, Inception-v3 classifier"
        ),
        "clip_score": "100 * mean cosine(CLIP image embedding, CLIP prompt embedding) of generated images; clip_score_real: same for the real images",
    }  # fmt: skip


def log_to_wandb(report: dict[str, Any], out: Path) -> None:
    """The same report as a W&B run (offline unless WANDB_MODE says otherwise)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    stage = report["source"]["stage"]
    config = {k: report[k] for k in ("source", "data", "settings", "feature_extractor")}
    run = wandb.init(project="unclip-lightning", name=f"evaluate-{stage}", group=stage, job_type="evaluate", dir=str(out), config=config)
    row: dict[str, Any] = {f"eval/{k}": v for k, v in report["metrics"].items() if v is not None}
    row["eval/samples"] = [wandb.Image(str(out / s["path"]), caption=s["caption"]) for s in report["images"]["samples"]]
    if "samples_grid" in report["images"]:
        row["eval/samples_grid"] = wandb.Image(str(out / report["images"]["samples_grid"]))
    run.log(row)
    run.finish()


# -- command line ----------------------------------------------------------------------------------
