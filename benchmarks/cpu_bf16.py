"""Precision and memory layout of the demo's decoder on this CPU, side by side in one process
(interleaved rounds, best of each): a training step under fp32 / bf16 autocast, each with the
U-Net in NCHW (contiguous) or NHWC (channels_last), and one guided sampling evaluation (a batch of
conditional + null rows) in the same four settings, both again in bf16 NCHW at the demo overlay's
U-Net (experiments/demo/decoder.yaml) and at that U-Net with one layout field changed
(`DEMO_VARIANTS`: what each of its layout choices buys), the demo upsampler's evaluation at 64 px in
fp32 and bf16, and GroupNorm alone.

The demo trains its decoder under `precision: bf16-mixed` because oneDNN runs bf16 convolutions
on AMX / AVX512-BF16 units. The layout matters as much: torch's CPU GroupNorm is several times
slower on channels_last input than on contiguous input, most of all in bf16 (forward and
backward), which can outweigh oneDNN's preference for NHWC convolutions.

    python -m benchmarks.cpu_bf16 [--threads 2] [--rounds 5] [--batch 32]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import yaml

from benchmarks.harness import interleaved_rounds
from modules.stages.decoder import DecoderModule

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PRECISIONS = {"fp32": False, "bf16": True}  # name -> under bf16 autocast
# The demo overlay's U-Net with one field changed: name -> (what it is, the change).
DEMO_VARIANTS = {
    "demo top": ("with a down-path res block at 32 px (num_res_blocks 1)", {"num_res_blocks": 1}),
    "demo up after": ("with its up-convs after the upsampling (conv_before_upsample false)",
                      {"conv_before_upsample": False}),
}


def init_args(config: str) -> dict:
    """`model.init_args` of a YAML under experiments/, e.g. "decoder/tiny.yaml"."""
    return yaml.safe_load((ROOT / "experiments" / config).read_text())["model"]["init_args"]


def build(layout: str, **unet: Any) -> DecoderModule:
    """The tiny decoder of experiments/decoder/tiny.yaml (seed 0) in the given layout, with any
    `unet` fields replaced."""
    torch.manual_seed(0)
    cfg = init_args("decoder/tiny.yaml")
    cfg["unet"] = {**cfg["unet"], **unet, "channels_last": layout == "nhwc"}
    return DecoderModule(**cfg)


def demo_width() -> dict[str, Any]:
    """The U-Net fields experiments/demo/decoder.yaml changes, other than the layout."""
    return {k: v for k, v in init_args("demo/decoder.yaml")["unet"].items() if k != "channels_last"}


def groupnorm(shape: tuple[int, ...], groups: int, bf16: bool, layout: str) -> Callable[[], None]:
    """One GroupNorm forward + backward on a tensor of `shape` (torch's CPU kernel)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
    weight = torch.ones(shape[1], dtype=dtype, requires_grad=True)
    bias = torch.zeros(shape[1], dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    return lambda: torch.nn.functional.group_norm(x, groups, weight, bias).backward(grad)


def upsampler_eval(batch: int) -> Callable[[bool], None]:
    """One U-Net evaluation of the demo's upsampler at its output size (it samples unguided),
    fp32 or under bf16 autocast."""
    from modules.stages.superres import SuperResModule

    torch.manual_seed(0)
    module = SuperResModule(**init_args("superres/tiny.yaml")).eval()
    size, low = module.unet.config.image_size, module.hparams.low_res_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    low_res = torch.rand(batch, 3, low, low, generator=gen) * 2 - 1
    t = torch.full((batch,), 500)

    @torch.no_grad()
    def run(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            module.unet(x, t, low_res=low_res)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    modules = {layout: build(layout) for layout in LAYOUTS}
    width = demo_width()
    modules["demo"] = build("nchw", **width)  # the demo overlay's U-Net: narrower, more steps
    for name, (_, change) in DEMO_VARIANTS.items():
        modules[name] = build("nchw", **{**width, **change})
    size = modules["nchw"].unet.config.image_size
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(a.batch, 3, size, size, generator=gen) * 2 - 1,
             "tokens": open_clip.get_tokenizer("tiny-vit")(["a red circle to the left of a blue square"] * a.batch)}
    cond = modules["nchw"].condition(batch, drop=True)
    t = modules["nchw"].diffusion.sample_timesteps(a.batch, device="cpu")
    opts = {layout: torch.optim.AdamW(m.unet.parameters(), 1e-3) for layout, m in modules.items()}

    def train(layout: str, bf16: bool) -> Callable[[], None]:
        module, opt = modules[layout], opts[layout]

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = module.diffusion.training_losses(module.unet, batch["image"], t, model_kwargs=cond)["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def sample(layout: str, bf16: bool) -> Callable[[], None]:
        module = modules[layout]
        guided = {k: torch.cat([v, v]) for k, v in module.unet_kwargs(cond).items()}  # CFG: conditional + null rows
        x = torch.cat([batch["image"], batch["image"]])

        @torch.no_grad()
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                module.unet(x, torch.cat([t, t]), **guided)
        return step

    upsample = upsampler_eval(a.batch)
    norm_shapes = (((a.batch, 48, size, size), 16), ((a.batch, 96, size // 2, size // 2), 32))
    cases: dict[str, Callable[[], None]] = {}
    for prec, bf16 in PRECISIONS.items():
        for layout in LAYOUTS:
            cases[f"train {prec} {layout}"] = train(layout, bf16)
            cases[f"sample {prec} {layout}"] = sample(layout, bf16)
            for shape, groups in norm_shapes:
                cases[f"groupnorm {shape} {prec} {layout}"] = groupnorm(shape, groups, bf16, layout)
        cases[f"upsample {prec}"] = functools.partial(upsample, bf16)
    for name in ("demo", *DEMO_VARIANTS):
        cases[f"train bf16 {name}"], cases[f"sample bf16 {name}"] = train(name, True), sample(name, True)
    times = interleaved_rounds(cases, a.rounds)  # one warm-up pass: oneDNN primitive creation
    best = {name: min(v) for name, v in times.items()}
    print(f"best of {a.rounds} interleaved rounds, {a.threads} threads")
    print(f"tiny.yaml decoder, batch {a.batch} (ms):")
    for kind in ("train", "sample"):
        for prec in PRECISIONS:
            for layout in LAYOUTS:
                print(f"  {kind} {prec} {layout:<8} {best[f'{kind} {prec} {layout}'] * 1e3:7.0f}")
    for prefix in ("train fp32", "train bf16", "sample fp32", "sample bf16"):
        print(f"  {prefix}: nhwc / nchw time ratio {best[f'{prefix} nhwc'] / best[f'{prefix} nchw']:.2f}")
    for kind in ("train", "sample"):
        print(f"  {kind}: bf16 speed-up nchw {best[f'{kind} fp32 nchw'] / best[f'{kind} bf16 nchw']:.2f}x, "
              f"nhwc {best[f'{kind} fp32 nhwc'] / best[f'{kind} bf16 nhwc']:.2f}x")
    print(f"demo overlay's U-Net ({width}, bf16, nchw) against tiny.yaml's (ms): "
          f"train {best['train bf16 demo'] * 1e3:.0f} / {best['train bf16 nchw'] * 1e3:.0f} "
          f"({best['train bf16 nchw'] / best['train bf16 demo']:.2f}x), "
          f"sample {best['sample bf16 demo'] * 1e3:.0f} / {best['sample bf16 nchw'] * 1e3:.0f} "
          f"({best['sample bf16 nchw'] / best['sample bf16 demo']:.2f}x)")
    for name, (label, _) in DEMO_VARIANTS.items():
        cells = [f"{kind} {best[f'{kind} bf16 {name}'] * 1e3:.0f} / {best[f'{kind} bf16 demo'] * 1e3:.0f} "
                 f"({best[f'{kind} bf16 {name}'] / best[f'{kind} bf16 demo']:.2f}x)" for kind in ("train", "sample")]
        print(f"the same {label} against the demo's (ms): " + ", ".join(cells))
    print(f"demo upsampler (experiments/superres/tiny.yaml), one U-Net evaluation at 64 px (it samples unguided), batch {a.batch} (ms):")
    up = {prec: best[f"upsample {prec}"] * 1e3 for prec in PRECISIONS}
    print(f"  fp32 {up['fp32']:7.0f}   bf16 {up['bf16']:7.0f}   bf16 speed-up {up['fp32'] / up['bf16']:.2f}x")
    print("GroupNorm forward + backward alone, the decoder's activation shapes (ms):")
    for shape, _ in norm_shapes:
        cells = [f"{p} {layout} {best[f'groupnorm {shape} {p} {layout}'] * 1e3:6.2f}" for p in PRECISIONS for layout in LAYOUTS]
        print(f"  {str(shape):<18} " + "   ".join(cells))


if __name__ == "__main__":
    main()
