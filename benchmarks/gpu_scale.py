"""GPU-sized decoder and prior (issue 22 §4): model FLOPs utilisation and which stage configs fit.

One script for one GPU machine, about 8 minutes on an H100:

1. The bf16 matmul peak: `torch.mm` of n x n bf16 matrices (`matmul_peak.measure`), the MFU yardstick.
2. Timed training rows: the 534M decoder of `experiments/decoder/gpu_300m.yaml` at batch 64 and the
   paper prior (width 2048, depth 24, 1.23B, `experiments/prior/paper.yaml` with activation
   checkpointing off) at batch 256. bf16 autocast, SDPA (flash / cuDNN / efficient kernels, torch's
   choice), `torch.compile` of the network, channels-last (the decoder YAML's), fused AdamW. The
   FLOPs of one step are counted with FlopCounterMode on the network before it is compiled (the
   same module, eager: dynamo must not first see it under a dispatch mode); MFU = FLOPs per step /
   median step wall time / measured bf16 peak.
3. A memory-fit table: for each stage config and per-GPU batch, the training memory, and whether
   it fits 24 / 40 / 80 GB cards (95% of the nominal GiB usable). On CUDA each row is measured:
   `max_memory_allocated` over one eager bf16 step (as configured: activation checkpointing where
   the YAML has it) plus 4 B/param for the EMA copy the step does not hold; an OOM is reported as
   "does not fit". Every row also carries an estimate, the only figure on CPU:
   20 B/param (fp32 weights 4 + grads 4 + AdamW 8 + EMA 4) + 2 B/param (autocast's bf16 weight
   copies) + activations, where the activations per sample are the bytes autograd saves for one
   bf16 forward on the meta device (saved-tensor hooks; the difference between batch 2 and batch
   1, so weights saved for backward do not count as activations), with attention saving what the
   flash kernel saves (q, k, v, out, log-sum-exp). Activation checkpointing is not modelled: the
   estimate of a checkpointed config is its upper bound without checkpointing.

Every figure is labelled "measured" (on the GPU) or "estimated" (counters). Without CUDA the
script runs end to end with `--quick`: the timed rows shrink to tiny widths in fp32 on the CPU
(labelled "cpu-quick"), the memory table is all estimates.

    python -m benchmarks.gpu_scale [--steps N] [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
import unittest.mock
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import harness, matmul_peak

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = {"weights": 4, "grads": 4, "adamw": 8, "ema": 4}  # fp32 master state: 20 B/param
AUTOCAST_COPY_BYTES = 2  # the bf16 copy of every weight autocast casts once per step (kept for backward)
CARDS_GB = (24, 40, 80)
USABLE = 0.95  # of a card's nominal GiB: CUDA context, allocator fragmentation
MFU_TARGET = 0.40
TEXT_LEN = 77  # caption tokens per sample, all real (the worst case)
GiB = 2**30

# (name, YAML, overrides of model.init_args for the timed row, batch per GPU, quick CPU overrides, quick batch)
TIMED = [
    ("decoder/gpu_300m", "experiments/decoder/gpu_300m.yaml", {}, 64,
     {"unet.model_channels": 32, "unet.image_size": 32, "unet.num_res_blocks": 1, "unet.num_head_channels": 32,
      "unet.attention_resolutions": [8], "clip_model": "tiny-vit"}, 2),
    ("prior/paper (1B-class, width 2048)", "experiments/prior/paper.yaml", {"prior.use_checkpoint": False}, 256,
     {"prior.width": 128, "prior.depth": 2, "prior.heads": 2, "clip_model": "tiny-vit"}, 4),
]
# (name, YAML, per-GPU batches) for the memory-fit table; the YAML's own per-GPU batch is among them
FIT = [
    ("decoder/gpu_300m", "experiments/decoder/gpu_300m.yaml", (32, 64, 128)),
    ("decoder/paper", "experiments/decoder/paper.yaml", (8, 32)),
    ("prior/paper", "experiments/prior/paper.yaml", (256, 512)),
    ("superres/paper_256", "experiments/superres/paper_256.yaml", (32, 128)),
    ("superres/paper_1024", "experiments/superres/paper_1024.yaml", (8, 64)),
]


# ------------------------------------------------------------------------------ building stages
def build_stage(yaml_path: str, device: torch.device | str, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The YAML's stage module from its `model:` section (an allow-listed stage class and its
    `init_args`, which the stage's typed configs validate), `overrides` applied to `init_args`
    first, created on `device` (meta: no memory)."""
    import yaml

    from modules.stages.registry import stage_class, stage_kind

    model = yaml.safe_load((ROOT / yaml_path).read_text())["model"]
    kind = stage_kind(model["class_path"])
    if kind is None:
        raise ValueError(f"{yaml_path}: model.class_path {model['class_path']!r} is not a stage")
    init = dict(model.get("init_args") or {})
    for key, value in (overrides or {}).items():
        node = init
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    cls = stage_class(kind, model["class_path"], yaml_path)
    with torch.device(device):
        return cls(**init)


def network(module: torch.nn.Module) -> torch.nn.Module:
    """The trained network of a stage module (decoder / upsampler: `unet`, prior: `net`)."""
    return module.net if hasattr(module, "net") else module.unet


def params_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in network(module).parameters() if p.requires_grad)


def kind_of(module: torch.nn.Module) -> str:
    name = type(module).__name__
    return {"DecoderModule": "decoder", "PriorModule": "prior", "SuperResModule": "superres"}[name]


def make_batch(module: torch.nn.Module, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Synthetic inputs of one training step, conditioning as exported embeddings (no CLIP runs)."""
    kind = kind_of(module)
    if kind == "superres":
        c = module.crop_size
        return {"x0": torch.zeros(batch, 3, c, c, device=device, dtype=dtype),
                "low_res": torch.zeros(batch, 3, c // module.factor, c // module.factor, device=device, dtype=dtype)}
    d, w = module.conditioner.embed_dim, module.conditioner.text_width
    out = {"image_embed": torch.zeros(batch, d, device=device, dtype=dtype),
           "text_embed": torch.zeros(batch, d, device=device, dtype=dtype),
           "text_tokens": torch.zeros(batch, TEXT_LEN, w, device=device, dtype=dtype),
           "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool, device=device)}
    if device.type != "meta":
        for key in ("image_embed", "text_embed", "text_tokens"):
            out[key] = torch.randn_like(out[key])
    if kind == "decoder":
        size = network(module).config.image_size
        out["image"] = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).to(dtype) if device.type != "meta" else \
            torch.zeros(batch, 3, size, size, device=device, dtype=dtype)
    return out


def training_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stage's training loss (its `training_step` minus the CLIP conditioner and logging): the
    same diffusion loss, CFG dropout and network call. Runs on the meta device too."""
    kind, diffusion = kind_of(module), module.diffusion
    if kind == "superres":
        x0 = batch["x0"]
        cond = {"low_res": batch["low_res"], "aug_level": module.training_levels(x0.shape[0], x0.device)}
        net = module.unet
    elif kind == "decoder":
        x0, net = batch["image"], module.unet
        cond = module.unet_kwargs({k: batch[k] for k in ("image_embed", "text_embed", "text_tokens", "text_mask")}, drop=True)
    else:
        x0, net = module.to_x0(batch["image_embed"]), module.net
        cond = module.model_kwargs(batch, drop_prob=module.hparams.drop_text_prob)
    t = diffusion.sample_timesteps(x0.shape[0], device=x0.device)
    return diffusion.training_losses(net, x0, t, model_kwargs=cond)["loss"].mean()


# ------------------------------------------------------------------------------ peak
def matmul_peak_flops(device: torch.device, quick: bool) -> dict[str, Any]:
    """Measured dense-GEMM peak: bf16 `torch.mm` at n = 8192 on CUDA; on CPU fp32 (quick: n = 512)."""
    n = 8192 if device.type == "cuda" else (512 if quick else 2048)
    result = matmul_peak.measure(device, n, repeats=10 if device.type == "cuda" else 3)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return {"n": n, "dtype": dtype, "peak_flops": result["peak"][dtype]["flops_wall"],
            "fp32_flops": result["peak"]["fp32"]["flops_wall"], "bf16_flops": result["peak"]["bf16"]["flops_wall"]}


# ------------------------------------------------------------------------------ timed rows
def timed_row(name: str, yaml: str, overrides: dict[str, Any], batch: int, *, device: torch.device, bf16: bool,
              compile_net: bool, steps: int, warmup: int, peak: float, deadline: float) -> dict[str, Any]:
    """Warm-up + timed training steps of one stage; FLOPs, TFLOP/s, MFU and peak memory."""
    row: dict[str, Any] = {"name": name, "yaml": yaml, "overrides": overrides, "batch": batch, "device": str(device),
                           "precision": "bf16-autocast" if bf16 else "fp32", "compile": compile_net,
                           "label": "measured" if device.type == "cuda" else "cpu-quick"}
    module = build_stage(yaml, device, overrides)
    module.train()
    net = network(module)
    row["params"] = params_of(module)
    row["channels_last"] = bool(getattr(net.config, "channels_last", False))
    data = make_batch(module, batch, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = training_loss(module, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row["flops_per_step"] = harness.count_flops(step)  # eager, before compile (FlopCounterMode + CPU kernels)
    if compile_net:
        net.compile()
    t0 = time.perf_counter()
    step()  # the first compiled step compiles
    harness.synchronize(device)
    row["first_step_s"] = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    harness.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for _ in range(steps):
        if times and time.perf_counter() + times[-1] > deadline:
            row["stopped_early"] = "time box"
            break
        w0 = time.perf_counter()
        step()
        harness.synchronize(device)
        times.append(time.perf_counter() - w0)
    wall = statistics.median(times)
    row.update(steps=len(times), step_s=wall, step_all_s=times, samples_per_s=batch / wall,
               achieved_tflops=row["flops_per_step"] / wall / 1e12, mfu=row["flops_per_step"] / wall / peak,
               mfu_target=MFU_TARGET)
    row["meets_target"] = row["mfu"] >= MFU_TARGET
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        row["sdpa_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(), "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}
    return row


# ------------------------------------------------------------------------------ memory estimate
class _FlashLikeSDPA(torch.autograd.Function):
    """SDPA whose backward state is what flash attention keeps: q, k, v, out and the (B, H, Q) fp32
    log-sum-exp; torch's math path on the meta device would also save the (Q, K) attention matrix."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float) -> torch.Tensor:
        with torch.no_grad():
            out = _SDPA(q, k, v, attn_mask=mask)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: estimates make no backward pass
        raise NotImplementedError


_SDPA = F.scaled_dot_product_attention


def _flash_like(q, k, v, attn_mask=None, dropout_p=0.0, **_: Any):  # noqa: ANN001, ANN202
    return _FlashLikeSDPA.apply(q, k, v, attn_mask, dropout_p)


def saved_activation_bytes(module: torch.nn.Module, batch: int) -> int:
    """Bytes autograd saves for backward in one bf16 training forward at `batch`, on the meta device."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    data = make_batch(module, batch, torch.device("meta"), torch.bfloat16)
    with unittest.mock.patch.object(F, "scaled_dot_product_attention", _flash_like), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_loss(module, data)
    return total


def training_state_bytes(params: int) -> int:
    """fp32 weights + grads + AdamW's two moments + an EMA copy: 20 bytes per parameter."""
    return params * sum(BYTES_PER_PARAM.values())


def estimate_memory(module_meta: torch.nn.Module, batches: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Estimated training bytes per batch: states + autocast weight copies + saved activations.
    The module is on the meta device; activation checkpointing is switched off (an upper bound)."""
    net = network(module_meta)
    module_meta.train()
    checkpointed = bool(net.config.use_checkpoint)
    # the U-Nets read the flag from their config, the prior's TransformerStack keeps its own copy
    flagged = [m for m in [net.config, *net.modules()] if getattr(m, "use_checkpoint", False)]
    for m in flagged:
        m.use_checkpoint = False
    net.to(torch.bfloat16)
    try:
        one, two = saved_activation_bytes(module_meta, 1), saved_activation_bytes(module_meta, 2)
    finally:
        for m in flagged:
            m.use_checkpoint = True
    per_sample = max(two - one, 0)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = {}
    for b in batches:
        states, copies, acts = training_state_bytes(params), AUTOCAST_COPY_BYTES * params, per_sample * b
        out[b] = {"params": params, "states_gib": states / GiB, "autocast_copies_gib": copies / GiB,
                  "activations_gib": acts / GiB, "total_gib": (states + copies + acts) / GiB,
                  "activation_bytes_per_sample": per_sample, "checkpointing_modelled": False,
                  "yaml_checkpointing": checkpointed}
    return out


def measure_memory(yaml: str, batch: int, device: torch.device) -> dict[str, Any]:
    """Peak allocated GiB of one eager bf16 training step (fused AdamW, as configured) + the EMA copy."""
    module = build_stage(yaml, device)
    module.train()
    net = network(module)
    params = params_of(module)
    data = make_batch(module, batch, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = training_loss(module, data)
    loss.backward()
    opt.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    ema = BYTES_PER_PARAM["ema"] * params
    return {"peak_step_gib": peak / GiB, "ema_gib": ema / GiB, "total_gib": (peak + ema) / GiB}


def fits(total_gib: float | None) -> dict[str, bool | None]:
    return {f"{gb}GB": None if total_gib is None else total_gib <= USABLE * gb for gb in CARDS_GB}


def fit_table(device: torch.device, deadline: float, rows: list[tuple[str, str, tuple[int, ...]]]) -> list[dict[str, Any]]:
    table = []
    for name, yaml, batches in rows:
        try:
            estimates = estimate_memory(build_stage(yaml, "meta"), batches)
        except Exception as exc:  # a stage that cannot be built: say so, go on
            table.append({"stage": name, "yaml": yaml, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for b in batches:
            est = estimates[b]
            row: dict[str, Any] = {"stage": name, "yaml": yaml, "batch_per_gpu": b, "params": est["params"],
                                   "estimated": est, "estimated_fits": fits(est["total_gib"])}
            if device.type == "cuda":
                if time.perf_counter() > deadline:
                    row["measured"] = {"status": "skipped: time budget"}
                else:
                    try:
                        m = measure_memory(yaml, b, device)
                        row["measured"] = {"status": "ok", **m}
                        row["measured_fits"] = fits(m["total_gib"])
                    except torch.cuda.OutOfMemoryError:
                        row["measured"] = {"status": f"does not fit (OOM on this {torch.cuda.get_device_name(device)})"}
                        card = torch.cuda.get_device_properties(device).total_memory  # no smaller card fits it either
                        row["measured_fits"] = {f"{gb}GB": False for gb in CARDS_GB if gb * GiB <= card * 1.1}
                    finally:
                        gc.collect()
                        torch.cuda.empty_cache()
            table.append(row)
    return table


# ------------------------------------------------------------------------------ report
def format_report(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}  torch {result['torch']}  ({result['mode']})"]
    p = result["peak"]
    lines.append(f"matmul peak ({p['dtype']}, n={p['n']}): {p['peak_flops'] / 1e12:.1f} TFLOP/s  [measured]")
    lines.append("")
    lines.append(f"{'row':36s} {'params':>8s} {'batch':>5s} {'GFLOP/step':>11s} {'step ms':>8s} {'TFLOP/s':>8s} "
                 f"{'MFU':>6s} {'mem GiB':>8s}  label")
    for r in result["timed"]:
        if "error" in r:
            lines.append(f"{r['name']:36s} {r['error']}")
            continue
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        lines.append(f"{r['name']:36s} {r['params'] / 1e6:7.1f}M {r['batch']:5d} {r['flops_per_step'] / 1e9:11.1f} "
                     f"{1e3 * r['step_s']:8.1f} {r['achieved_tflops']:8.3f} {100 * r['mfu']:5.1f}% {mem:>8s}  {r['label']}"
                     + ("" if r["label"] == "measured" else " (not the GPU configuration)"))
    lines.append("")
    lines.append(f"memory fit (train step + EMA; fits = <= {USABLE:.0%} of the card's GiB)")
    lines.append(f"{'stage':22s} {'params':>8s} {'batch':>5s} {'est GiB':>8s} {'fits 24/40/80 (est)':>20s} "
                 f"{'meas GiB':>9s} {'fits 24/40/80 (meas)':>21s}")
    yes = lambda v: "-" if v is None else ("yes" if v else "no")  # noqa: E731
    for r in result["fit"]:
        if "error" in r:
            lines.append(f"{r['stage']:22s} not built: {r['error']}")
            continue
        est = r["estimated"]
        ef = "/".join(yes(v) for v in r["estimated_fits"].values())
        m = r.get("measured", {})
        mg = f"{m['total_gib']:.1f}" if m.get("status") == "ok" else ("OOM" if "OOM" in m.get("status", "") else "-")
        mf = "/".join(yes(r.get("measured_fits", {}).get(f"{gb}GB")) for gb in CARDS_GB) if m else "not measured"
        note = " (ckpt in YAML: est. is upper bound)" if est["yaml_checkpointing"] else ""
        lines.append(f"{r['stage']:22s} {r['params'] / 1e6:7.1f}M {r['batch_per_gpu']:5d} {est['total_gib']:8.1f} "
                     f"{ef:>20s} {mg:>9s} {mf:>21s}{note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    harness.quiet_warnings()
    import logging

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0" per build
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.quick:
        raise SystemExit("no CUDA device: run with --quick (CPU smoke run, estimates only)")
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers on tensor cores; the rows are bf16
        torch.backends.cudnn.allow_tf32 = True
    result: dict[str, Any] = {"bench": "gpu_scale", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                              "torch": torch.__version__, "mode": "gpu" if cuda else "cpu-quick (estimates only)",
                              "budget_s": args.budget_s}
    result["peak"] = matmul_peak_flops(device, args.quick)
    result["timed"] = []
    budget_end = start + args.budget_s
    for i, (name, yaml, overrides, batch, quick_overrides, quick_batch) in enumerate(TIMED):
        remaining = budget_end - time.perf_counter()
        share = remaining * (0.6 if i == 0 else 0.5) if cuda else remaining / (len(TIMED) - i)  # leave time for the fit table
        try:
            row = timed_row(name, yaml, overrides if cuda else {**overrides, **quick_overrides},
                            batch if cuda else quick_batch, device=device, bf16=cuda, compile_net=cuda and not args.no_compile,
                            steps=args.steps, warmup=args.warmup, peak=result["peak"]["peak_flops"],
                            deadline=time.perf_counter() + share)
        except torch.cuda.OutOfMemoryError:
            row = {"name": name, "error": f"does not fit at batch {batch} (OOM)"}
        except Exception as exc:
            row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        result["timed"].append(row)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
    fit_rows = FIT if not args.fit_only else [r for r in FIT if r[0] in args.fit_only]
    result["fit"] = fit_table(device, budget_end, fit_rows)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 on CUDA, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3; 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny timed rows, memory estimates only")
    parser.add_argument("--cpu", action="store_true", help="ignore CUDA even where there is one")
    parser.add_argument("--no-compile", action="store_true", help="eager timed rows")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time box of the whole run (rows stop or skip)")
    parser.add_argument("--fit-only", nargs="*", default=None, help="memory-fit rows to run (stage names)")
    args = parser.parse_args(argv)
    quick_cpu = args.quick and not (torch.cuda.is_available() and not args.cpu)
    args.steps = args.steps or (2 if quick_cpu else 10)
    args.warmup = args.warmup or (1 if quick_cpu else 3)
    if quick_cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = run(args)
    print(format_report(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, args.out)
    harness.emit({k: v for k, v in result.items()})


if __name__ == "__main__":
    main()
