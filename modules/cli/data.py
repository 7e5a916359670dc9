"""`unclip data shapes ...`: write the built-in shapes dataset as WebDataset shards."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from modules.cli.args import Parser, count, output_dir, real
from modules.core.errors import UserError


def add_shapes_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``unclip data shapes`` (defaults from ``ShapesConfig``)."""
    from datamodules.shapes.dataset import ShapesConfig

    d = ShapesConfig()
    parser.add_argument("--out", required=True, type=output_dir, help="output folder for shards and stats.json")
    parser.add_argument("--num-samples", type=count(1, 100_000_000), default=d.num_samples, help="train + val samples")
    parser.add_argument("--size", type=count(8, 4096), default=d.size, help="image side in pixels")
    parser.add_argument("--seed", type=count(0, 2**63 - 1), default=d.seed)
    parser.add_argument("--shard-size", type=count(1, 10_000_000), default=d.shard_size, help="samples per .tar")
    parser.add_argument("--val-fraction", type=real(0.0, 0.99), default=d.val_fraction)
    parser.add_argument("--two-object-fraction", type=real(0.0, 1.0), default=d.two_object_fraction)
    parser.add_argument("--holdout", nargs="+", default=[], metavar="ITEM",
                        help="COLOR:SHAPE or COLOR:SHAPE,COLOR:SHAPE kept out of train")
    parser.add_argument("--val-holdout-fraction", type=real(0.0, 1.0), default=d.val_holdout_fraction,
                        help="with --holdout: fraction of val samples built around a held-out item")
    parser.add_argument("--workers", type=count(1, 1024), default=os.cpu_count(), help="processes (whole shards each)")
    return parser


def run_shapes(args: argparse.Namespace) -> None:
    """Generate the dataset from parsed ``add_shapes_arguments`` options and print a summary."""
    from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset

    config = ShapesConfig(num_samples=args.num_samples, size=args.size, seed=args.seed,
                          shard_size=args.shard_size, val_fraction=args.val_fraction,
                          two_object_fraction=args.two_object_fraction, holdout=tuple(args.holdout),
                          val_holdout_fraction=args.val_holdout_fraction)
    start = time.perf_counter()
    try:
        stats = write_shapes_dataset(config, args.out, workers=args.workers)
    except ValueError as exc:  # holdout syntax, fractions, an image size too small for the layout
        raise UserError(str(exc)) from None
    seconds = time.perf_counter() - start
    parts = [f"{s}: {v['num_samples']} samples in {v['pattern']}" for s, v in stats["splits"].items()]
    print(f"shapes -> {args.out} ({'; '.join(parts)}) in {seconds:.1f} s, "
          f"{config.num_samples / max(seconds, 1e-9):.0f} samples/s")


def main(argv: list[str]) -> int:
    parser = Parser(prog="unclip data", description="Write built-in datasets as WebDataset shards.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    add_shapes_arguments(sub.add_parser("shapes", help="the compositional shapes dataset"))
    run_shapes(parser.parse_args(argv))
    return 0
