"""FSDP probe: AdamW steps of the tiny decoder's U-Net sharded by torch FSDP on 2 CPU processes (gloo).

Lightning refuses `strategy: fsdp` on a CPU accelerator ("The strategy `fsdp` requires a GPU
accelerator, ..."); past that check its `FSDPStrategy._setup_model` would pass `device_id=None` on
CPU, which torch's FSDP refuses too ("FSDP needs a non-CPU accelerator device, ..."). So the probe
makes Lightning's wrapping call itself with `device_id=cpu`:
`FullyShardedDataParallel(unet, sharding_strategy=..., **strategy.kwargs)`, the strategy (auto-wrap
policy, sharding, `use_orig_params`) built by `unclip fit`'s parser from
`experiments/decoder/tiny.yaml` + `experiments/common/fsdp.yaml` (precision overridden to fp32).
The optimizer is the stage's own `configure_optimizers` (AdamW + warmup), the loss the stage's
diffusion `training_losses`.

Used two ways by `tests/test_fsdp.py`:
- `torchrun --nproc_per_node 2 tests/fsdp_probe.py --out DIR` trains under FSDP (rank r takes rows
  r*8..r*8+7 of each global batch) and writes `fsdp-rank<r>.pt` plus, from rank 0, a Lightning
  checkpoint `fsdp.ckpt` of the DecoderModule gathered into one state dict;
- `train(build()[0], rank=0, world_size=1)` in the test process is the single-process reference.

Equal global batches: every step's images, CLIP conditioning, t and ε come from a generator seeded
by the step, drawn for all 16 rows at once; each rank slices its rows. CFG dropout is off
(`unet_kwargs(..., drop=False)`), so the two runs differ only in the data-parallel arithmetic
(FSDP reduce-scatters the mean of the ranks' gradients of their 8-row mean losses, which is the
gradient of the 16-row mean). Three steps because zero-initialised layers hold the gradient back:
step 1 moves only the output convolution (and weight decay shrinks the nonzero weights), step 2 the
blocks' zero-initialised last layers as well, step 3 nearly every tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("experiments/decoder/tiny.yaml", "experiments/common/fsdp.yaml")
WEIGHT_DECAY = 0.1  # CLIP's tiny value; the decoder's YAMLs say 0, which would leave decay untested
OVERRIDES = ("--trainer.precision=32-true",  # the overlay says bf16-mixed; the reference is fp32
             f"--model.init_args.optimizer.weight_decay={WEIGHT_DECAY}")
GLOBAL_BATCH = 16
STEPS = 3
TOKENS = 5  # caption token encodings per sample


def build() -> tuple[Any, Any]:
    """(DecoderModule, FSDPStrategy) as `unclip fit` would build them from the tiny YAML + overlay;
    the CLI seeds with `seed_everything: 0` first, so every process initialises the same weights."""
    from tests.test_paper_configs import ParseOnlyCLI

    args = [a for c in CONFIGS for a in ("--config", str(ROOT / c))] + list(OVERRIDES)
    cli = ParseOnlyCLI(args=args, run=False)
    init = cli.parser.instantiate(cli.config)
    return init.model, init.trainer.strategy


def global_batch(module: Any, step: int) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """x0 (B, 3, S, S), t (B,), ε (B, 3, S, S) and the U-Net's conditioning kwargs of one step."""
    g = torch.Generator().manual_seed(1000 + step)
    size, width = module.unet.config.image_size, module.conditioner.embed_dim
    x0 = torch.rand(GLOBAL_BATCH, 3, size, size, generator=g) * 2 - 1
    t = module.diffusion.sample_timesteps(GLOBAL_BATCH, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    clip = {
        "image_embed": torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, width, generator=g), dim=-1),
        "text_tokens": torch.randn(GLOBAL_BATCH, TOKENS, module.conditioner.text_width, generator=g),
        "text_mask": torch.ones(GLOBAL_BATCH, TOKENS, dtype=torch.bool),
    }
    return x0, t, noise, module.unet_kwargs(clip, drop=False)


def shard_fsdp(module: Any, strategy: Any) -> None:
    """Replace `module.unet` by its FSDP wrapper, built the way Lightning's FSDPStrategy builds it
    (which passes `device_id=root_device.index`: a GPU's index, None on CPU)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    module.unet = FullyShardedDataParallel(module.unet, sharding_strategy=strategy.sharding_strategy,
                                           cpu_offload=strategy.cpu_offload, device_id=torch.device("cpu"), **strategy.kwargs)


def full_state_dict(module: Any) -> dict[str, Tensor]:
    """The whole module's state dict; under FSDP gathered on rank 0 (empty U-Net part elsewhere).
    Not `offload_to_cpu=True` as Lightning's full-checkpoint context has it: with CPU parameters
    that crashed rank 0 with SIGSEGV inside FSDP's post-state-dict clone (torch 2.13, 2 of 2 runs)."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    if not dist.is_initialized():
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(module, StateDictType.FULL_STATE_DICT, config):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unet_params(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith("unet.")}


def flat_param_sizes(module: Any) -> list[tuple[int, int, int]]:
    """Per FSDP unit's FlatParameter: (elements this rank stores, elements of the unsharded flat
    parameter with FSDP's alignment and divisibility padding, elements of its original parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m._flat_param for m in FullyShardedDataParallel.fsdp_modules(module) if m._flat_param is not None]
    return [(p.numel(), p._padded_unsharded_size.numel(), sum(p._numels)) for p in units]


def decay_group(module: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Names of the U-Net parameters in the optimizer's first (weight-decay) group, and its decay;
    under FSDP without the wrappers' `_fsdp_wrapped_module.` parts, as in one process."""
    names = {id(p): name.replace("_fsdp_wrapped_module.", "") for name, p in module.unet.named_parameters()}
    group = opt.param_groups[0]
    return {"names": sorted(names[id(p)] for p in group["params"]), "weight_decay": group["weight_decay"]}


def train(module: Any, rank: int, world_size: int) -> dict[str, Any]:
    """STEPS optimizer steps on this rank's rows of each global batch; returns the record."""
    configured = module.configure_optimizers()
    opt, sched = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    record: dict[str, Any] = {"params": [unet_params(full_state_dict(module))], "losses": [], "rank": rank,
                              "world_size": world_size, "decay": decay_group(module, opt)}
    for step in range(STEPS):
        x0, t, noise, cond = global_batch(module, step)
        cond = {k: v[rows] for k, v in cond.items()}
        losses = module.diffusion.training_losses(module.unet, x0[rows], t[rows], model_kwargs=cond, noise=noise[rows])
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mean_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world_size
        record["losses"].append(float(mean_loss))
        record["params"].append(unet_params(full_state_dict(module)))
    if world_size > 1:
        record["flat_param_sizes"] = flat_param_sizes(module)
    return record


def save_lightning_checkpoint(module: Any, state: dict[str, Tensor], path: Path) -> None:
    """The fields `load_stage_checkpoint` reads, written by the project's `AtomicCheckpointIO`."""
    import lightning

    from callbacks.checkpointing import AtomicCheckpointIO

    ckpt = {"state_dict": state, "hyper_parameters": dict(module.hparams), "global_step": STEPS,
            "pytorch-lightning_version": lightning.__version__}
    AtomicCheckpointIO().save_checkpoint(ckpt, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # the CLI parser gets its arguments from `args=` only
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    module, strategy = build()
    shard_fsdp(module, strategy)
    record = train(module, rank, world_size)
    state = full_state_dict(module)  # collective: every rank takes part, rank 0 receives
    if rank == 0:
        save_lightning_checkpoint(module, state, args.out / "fsdp.ckpt")
    else:
        del record["params"]  # rank0_only: the other ranks' gathered U-Net parts are empty
    torch.save(record, args.out / f"fsdp-rank{rank}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
