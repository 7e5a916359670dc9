"""CLIP-stage subcommands of the `unclip` console script.

`unclip embed --clip MODEL --weights PATH|none --shards PATTERN --out DIR [--fp16]` exports, for
every sample of an img2dataset-layout shard set, z_i, z_t and the caption's token encodings into
shards named like the source (see `datamodules.embeddings`). Resumable: complete output shards
are skipped; the folder's `meta.json` must describe the same CLIP, weights and dtype.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

from modules.cli.args import Parser, count, new_output, output_dir
from modules.core.errors import UserError


def weights_identity(weights: str | None) -> dict[str, Any] | None:
    """Path, size and mtime of a weights file: a rerun with retrained weights must not resume."""
    if weights is None:
        return None
    path = Path(weights).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {weights}")
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def export_embeddings(
    clip_model: str,
    weights: str | None,
    shards: str | list[str],
    out: str | Path,
    *,
    fp16: bool = False,
    batch_size: int = 256,
    num_workers: int = 2,
    image_size: int | None = None,
    accelerator: str = "auto",
    precision: str = "32-true",
    progress: bool = True,
) -> dict[str, Any]:
    """Write embedding shards for every source shard not yet complete in `out`; returns stats."""
    import lightning.pytorch as pl  # heavy imports only when the command runs
    from torch.utils.data import DataLoader

    from callbacks.embedding_writer import EmbeddingWriter
    from datamodules import embeddings
    from datamodules.shards import expand_shards, rank_and_world
    from modules.stages.clip import CLIPEmbedder

    rank, world = rank_and_world()  # one process per rank (torchrun): shards dealt by rank
    urls = expand_shards(shards)[rank::world]
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise UserError("source shards must have distinct file names (outputs are named like them)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    embedder = CLIPEmbedder(clip_model, weights)
    size = image_size or embedder.clip.image_size
    meta = {
        "clip_model": clip_model,
        "weights": weights_identity(weights),
        "dtype": "float16" if fp16 else "float32",
        "image_size": size,
        "embed_dim": embedder.clip.embed_dim,
        "text_width": embedder.clip.text_width,
    }
    try:
        embeddings.check_meta(out, meta)
    except embeddings.EmbeddingJoinError as exc:
        raise UserError(str(exc)) from None
    pending = [u for u in urls if not embeddings.is_complete_tar(out / Path(u).name)]
    stats: dict[str, Any] = {"shards_total": len(urls), "shards_skipped": len(urls) - len(pending), "samples": 0}
    if not pending:
        return {**stats, "shards_written": 0, "skipped": {}, "seconds": 0.0, "samples_per_s": 0.0}
    dataset = embeddings.ExportBatches(pending, size, batch_size, tokenizer=clip_model)
    workers = min(num_workers, len(pending))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
    writer = EmbeddingWriter(out, fp16=fp16, total_shards=len(pending), progress=progress)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():  # batches are not indexed by a sampler here, by design
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(embedder, dataloaders=loader, return_predictions=False)
    seconds = time.perf_counter() - start
    return {
        **stats,
        "samples": writer.samples,
        "shards_written": writer.shards_done,
        "skipped": writer.skipped,
        "seconds": seconds,
        "samples_per_s": writer.samples / max(seconds, 1e-9),
    }


def main(argv: list[str]) -> int:
    parser = Parser(prog="unclip embed", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--clip", required=True, help="open_clip model name (e.g. tiny-vit, ViT-H-14)")
    parser.add_argument("--weights", required=True, help="local weights file or CLIP-stage checkpoint; 'none' = random init")
    parser.add_argument("--shards", required=True, nargs="+", help="source shard patterns (brace/glob)")
    parser.add_argument("--out", required=True, type=output_dir, help="output folder")
    parser.add_argument("--fp16", action="store_true", help="store arrays as float16")
    parser.add_argument("--batch-size", type=count(1, 65536), default=256)
    parser.add_argument("--num-workers", type=count(0, 256), default=2)
    parser.add_argument("--image-size", type=count(8, 4096), default=None, help="loader resize (default: the CLIP input size)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="Lightning precision for the encoders, e.g. 16-mixed")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    weights = None if args.weights.lower() == "none" else args.weights
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: file not found")
    with new_output(args.out, keep_finished_files=True):
        stats = export_embeddings(
            args.clip,
            weights,
            args.shards,
            args.out,
            fp16=args.fp16,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            image_size=args.image_size,
            accelerator=args.accelerator,
            precision=args.precision,
            progress=not args.no_progress,
        )
    print(
        f"embed -> {args.out}: {stats['samples']} samples in {stats['shards_written']} shards "
        f"({stats['shards_skipped']} already complete), skipped {stats['skipped'] or 'none'}, "
        f"{stats['seconds']:.1f} s, {stats['samples_per_s']:.0f} samples/s"
    )
    return 0

