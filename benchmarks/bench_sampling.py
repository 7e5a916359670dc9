"""Sampling: seconds per run, ours vs dalle2-pytorch, same networks as the train-step benchmarks.

- decoder: 4 images at 64 px, 50 DDIM steps (η = 0), classifier-free guidance 3.0 (both sides
  evaluate the conditional and unconditional outputs at every step: ours as one batch of 2B,
  the peer as two passes);
- prior: 4 captions × 2 candidates (the paper's best-of-2 by z_i·z_t), 64 DDIM steps, guidance 1.0
  (the paper config's).

A short 2-step run warms up first; then `--steps` full runs are timed.

    python -m benchmarks.bench_sampling --model prior --side ours --match-params 24918544
"""

from __future__ import annotations

import argparse
from enum import Enum
from typing import Any

import torch

from benchmarks import bench_decoder, bench_prior, harness


class Model(str, Enum):
    DECODER = "decoder"
    PRIOR = "prior"


DEFAULTS = {Model.DECODER: dict(sample_steps=50, guidance=3.0, unit="images/s"),
            Model.PRIOR: dict(sample_steps=64, guidance=1.0, unit="embeddings/s")}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", type=Model, choices=list(Model), required=True)
    parser.add_argument("--match-params", type=int, default=None, help="ours: size the network to this many parameters")
    parser.add_argument("--model-channels", type=int, default=48, help="ours decoder, without --match-params")
    parser.add_argument("--layout", choices=list(bench_decoder.LAYOUTS), default="paper", help="ours decoder: U-Net layout")
    parser.add_argument("--mlp-hidden", type=int, default=None, help="ours prior, without --match-params")
    parser.add_argument("--sample-steps", type=int, default=None, help="default: 50 (decoder), 64 (prior)")
    parser.add_argument("--guidance", type=float, default=None, help="default: 3.0 (decoder), 1.0 (prior)")
    parser.add_argument("--sample-batch", type=int, default=4, help="images / captions per run")
    parser.add_argument("--count-only", action="store_true", help="report the parameter count and exit")
    parser.add_argument("--caption-tokens", type=int, default=None, help="prior: real tokens per caption (default 77)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="decoder: NHWC weights and activations, both sides")
    parser.set_defaults(fused_adam=False, checkpoint=False, recompute_norms=False, batch=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = harness.add_common_arguments(add_arguments(parser), steps=1, warmup=1).parse_args(argv)
    defaults = DEFAULTS[args.model]
    steps = args.sample_steps or defaults["sample_steps"]
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    device, memory = harness.start(args)
    module = bench_decoder if args.model is Model.DECODER else bench_prior
    built = module.build(args, device)
    result: dict[str, Any] = {"bench": f"{args.model.value}_sample", "params": built.params, "config": built.config,
                              **harness.environment(args, device)}
    if not args.count_only:
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for _ in range(args.warmup):
                built.sample(2, guidance, gen)
            timing = harness.time_steps(lambda: built.sample(steps, guidance, gen), steps=args.steps, warmup=0, device=device)
        result.update(**timing, **memory.report(), batch=args.sample_batch, sample_steps=steps, guidance=guidance,
                      unit=defaults["unit"], throughput=args.sample_batch / timing["wall_s"],
                      throughput_cpu=args.sample_batch / timing["cpu_s"])
    harness.emit(result)


if __name__ == "__main__":
    main()
