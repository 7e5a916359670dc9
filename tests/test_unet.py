"""Behavioural tests of the decoder U-Net and the upsampler U-Net (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.networks.superres_unet import Interpolation, SuperResUNet, SuperResUNetConfig
from modules.networks.unet import UNet, UNetConfig
from modules.networks.unet_blocks import (
    AttentionBlock, Conditioning, Downsample, Resample, ResBlock, Upsample, norm_modulate_silu, position_embedding_2d,
    timestep_embedding,
)

IMG_DIM, TXT_DIM, L = 12, 10, 5


def tiny_config(**overrides) -> UNetConfig:
    kwargs = dict(
        image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(16,), num_head_channels=8, image_embed_dim=IMG_DIM,
        text_embed_dim=TXT_DIM, context_dim=24,
    )
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def randomize_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers random weights, so every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def build(config: UNetConfig, cls=UNet) -> nn.Module:
    torch.manual_seed(0)
    return randomize_zero_init(cls(config)).eval()


def inputs(B: int = 2, size: int = 32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0 has 3 real tokens, then padding
    return dict(
        x=torch.randn(B, 3, size, size, generator=g),
        t=torch.randint(0, 1000, (B,), generator=g),
        image_embed=torch.randn(B, IMG_DIM, generator=g),
        text_tokens=torch.randn(B, L, TXT_DIM, generator=g),
        text_mask=mask,
    )


def run(model: nn.Module, kw: dict, **changes) -> torch.Tensor:
    kw = {**kw, **changes}
    return model(kw.pop("x"), kw.pop("t"), **kw)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 7.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize("size,batch", [(16, 1), (32, 2), (48, 3)])
@pytest.mark.parametrize("out_channels", [3, 6])
def test_output_shape(size: int, batch: int, out_channels: int):
    model = build(tiny_config(out_channels=out_channels))
    with torch.no_grad():
        out = run(model, inputs(batch, size))
    assert out.shape == (batch, out_channels, size, size)
    assert torch.isfinite(out).all()


def test_tiny_widths_and_resblock_updown():
    """12 channels with num_groups=32 -> gcd groups; BigGAN up/down blocks keep the shape."""
    model = build(tiny_config(model_channels=12, num_head_channels=64, resblock_updown=True,
                              channel_mult=(1, 2, 2), attention_resolutions=(16, 8)))
    with torch.no_grad():
        assert run(model, inputs(2, 16)).shape == (2, 3, 16, 16)


def test_per_level_res_blocks():
    """num_res_blocks per level (Efficient U-Net): down/up block counts follow it, skips line up,
    an int equals the same count repeated, and a count per missing level is a clear error."""
    cfg = tiny_config(channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 3), attention_resolutions=(8,))
    model = build(cfg)
    res_down = sum(isinstance(m[0], ResBlock) and m[0].resample is Resample.NONE for m in model.input_blocks)
    assert res_down == 1 + 2 + 3 and len(model.output_blocks) == 2 + 3 + 4
    with torch.no_grad():
        assert run(model, inputs(2, 16)).shape == (2, 3, 16, 16)
    same = [tiny_config(num_res_blocks=n) for n in (2, (2, 2))]
    assert build(same[0]).num_parameters() == build(same[1]).num_parameters()
    with pytest.raises(ValueError, match="num_res_blocks: 2 counts for 3 levels"):
        tiny_config(channel_mult=(1, 2, 2), num_res_blocks=(1, 2))
    with pytest.raises(ValueError, match=r"num_res_blocks: counts must be >= 0, got \(1, -1\)"):
        tiny_config(num_res_blocks=(1, -1))


def test_no_res_blocks_at_the_top_level():
    """A 0 count (Imagen's downsample-before-convolution order): the full-resolution down path is
    conv_in then the downsample, the up path keeps one full-resolution block to merge conv_in's skip,
    the output keeps its shape and depends on every input pixel, and the step costs fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    top0 = tiny_config(channel_mult=(1, 2, 2), num_res_blocks=(0, 1, 2), attention_resolutions=(8,))
    model = randomize_zero_init(build(top0))
    assert isinstance(model.input_blocks[0][0], Downsample)
    res_down = sum(isinstance(m[0], ResBlock) and m[0].resample is Resample.NONE for m in model.input_blocks)
    assert res_down == 0 + 1 + 2 and len(model.output_blocks) == 1 + 2 + 3
    x = inputs(2, 32)
    x["x"].requires_grad_(True)
    out = run(model, x)
    assert out.shape == (2, 3, 32, 32)
    out[0, :, 31, 31].sum().backward()
    assert x["x"].grad[0, :, 0, 0].abs().sum() > 0 and x["x"].grad[1].abs().sum() == 0
    flops = []
    for cfg in (tiny_config(channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 2), attention_resolutions=(8,)), top0):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run(build(cfg), inputs(2, 32))
        flops.append(counter.get_total_flops())
    assert flops[1] < flops[0]


def test_conv_before_upsample():
    """Imagen's order (Efficient U-Net): the up-conv runs at the low resolution and then the map is
    repeated, so the output is constant on 2x2 blocks and costs a quarter of the conv FLOPs; the
    parameters and state-dict keys are those of the ADM order."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    adm, imagen = Upsample(8), Upsample(8, conv_first=True)
    imagen.load_state_dict(adm.state_dict())
    x, cond = torch.randn(2, 8, 6, 6), Conditioning(torch.zeros(2, 4))
    y = imagen(x, cond)
    torch.testing.assert_close(y, F.interpolate(adm.conv(x), scale_factor=2.0, mode="nearest"))
    assert (y[..., ::2, ::2] == y[..., 1::2, 1::2]).all()
    flops = []
    for block in (adm, imagen):
        with FlopCounterMode(display=False) as counter:
            block(x, cond)
        flops.append(counter.get_total_flops())
    assert flops[1] * 4 == flops[0]
    base, swapped = build(tiny_config()), build(tiny_config(conv_before_upsample=True))
    assert swapped.state_dict().keys() == base.state_dict().keys()
    assert swapped.num_parameters() == base.num_parameters()
    with torch.no_grad():
        assert run(swapped, inputs()).shape == (2, 3, 32, 32)
        assert not torch.allclose(run(swapped, inputs()), run(base, inputs()))
    with pytest.raises(ValueError, match="conv_before_upsample"):
        tiny_config(conv_before_upsample=True, resblock_updown=True)


def test_output_depends_on_conditioning():
    model, kw = build(tiny_config()), inputs()
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        keep = dict(drop_image=no, drop_text=no)
        base = run(model, kw, **keep)
        other_image = run(model, kw, image_embed=torch.randn(2, IMG_DIM), **keep)
        other_text = run(model, kw, text_tokens=torch.randn(2, L, TXT_DIM), **keep)
        drop_image = run(model, kw, drop_image=yes, drop_text=no)
        drop_text = run(model, kw, drop_image=no, drop_text=yes)
    for changed in (other_image, other_text, drop_image, drop_text):
        per_sample = (changed - base).flatten(1).abs().amax(1)
        assert (per_sample > 1e-4).all()


def test_dropped_conditioning_is_replaced_by_null():
    model, kw = build(tiny_config()), inputs()
    drop = torch.tensor([True, False])
    new_image = kw["image_embed"].clone()
    new_image[0] += 5.0  # change the dropped sample's z_i ...
    new_text = kw["text_tokens"] + 3.0  # ... and everybody's caption
    with torch.no_grad():
        base = run(model, kw, drop_image=drop)
        moved = run(model, kw, image_embed=new_image, drop_image=drop)
        no_image = run(model, kw, image_embed=None)  # missing = dropped for every sample
        text_base = run(model, kw, drop_text=drop)
        text_moved = run(model, kw, text_tokens=new_text, drop_text=drop)
        text_none = run(model, kw, text_tokens=None, text_mask=None)
    torch.testing.assert_close(moved[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(no_image[0], base[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_moved[0], text_base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(text_none[0], text_base[0], rtol=1e-5, atol=1e-5)
    assert (text_moved[1] - text_base[1]).abs().max() > 1e-4  # the kept caption still matters


def test_masked_caption_tokens_do_not_matter():
    model, kw = build(tiny_config()), inputs()
    garbage = kw["text_tokens"].clone()
    garbage[0, 3:] = torch.randn(L - 3, TXT_DIM) * 100.0  # only the padding of sample 0
    all_masked = kw["text_mask"].clone()
    all_masked[0] = False  # an empty caption is the null caption
    with torch.no_grad():
        base = run(model, kw)
        padded = run(model, kw, text_tokens=garbage)
        empty = run(model, kw, text_mask=all_masked)
        dropped = run(model, kw, drop_text=torch.tensor([True, False]))
    torch.testing.assert_close(padded, base, rtol=0, atol=1e-6)
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[0], dropped[0], rtol=0, atol=1e-6)


def test_caption_encoder_reads_the_whole_caption():
    """With ``text_layers``, a token's context entry depends on later tokens (the frozen CLIP's
    causal states cannot); the null/padding invariants above still hold."""
    config = tiny_config(text_layers=2)
    model, kw = build(config), inputs()
    assert sum(p.numel() for p in model.conditioner.text_encoder.parameters()) > 0
    emb = model.embed_timestep(kw["t"])
    later = kw["text_tokens"].clone()
    later[:, 2] += 3.0  # change the third token of both captions
    with torch.no_grad():
        ctx = model.conditioner(emb, kw["image_embed"], kw["text_tokens"], kw["text_mask"]).context
        moved = model.conditioner(emb, kw["image_embed"], later, kw["text_mask"]).context
        plain = build(tiny_config())
        ctx_plain = plain.conditioner(emb, kw["image_embed"], kw["text_tokens"], kw["text_mask"]).context
        moved_plain = plain.conditioner(emb, kw["image_embed"], later, kw["text_mask"]).context
    first = config.num_image_tokens + 1  # context: image tokens, null token, caption tokens
    assert (moved[:, first] - ctx[:, first]).abs().max() > 1e-3  # the first caption token sees the third
    torch.testing.assert_close(moved_plain[:, first], ctx_plain[:, first], rtol=0, atol=1e-6)
    garbage = kw["text_tokens"].clone()
    garbage[0, 3:] = torch.randn(L - 3, TXT_DIM) * 100.0  # sample 0's padding
    drop = torch.tensor([True, False])
    with torch.no_grad():
        torch.testing.assert_close(run(model, kw, text_tokens=garbage), run(model, kw), rtol=0, atol=1e-5)
        torch.testing.assert_close(run(model, kw, text_tokens=later, drop_text=drop)[0],
                                   run(model, kw, drop_text=drop)[0], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="num_head_channels"):
        tiny_config(text_layers=1, context_dim=20)


@pytest.mark.parametrize("memory_option", ["use_checkpoint", "recompute_norms"])
def test_gradient_checkpointing_matches(memory_option: str):
    kw = inputs()
    outs, grads = [], []
    for enabled in (False, True):
        model = build(tiny_config(**{memory_option: enabled}, dropout=0.1)).train()
        torch.manual_seed(123)  # same dropout masks; checkpoint replays the RNG state
        out = run(model, kw, drop_image=torch.tensor([True, False]))
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def saved_bytes(model: nn.Module, kw: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model, kw)
    return sum(storages.values())


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_norm_silu_matches_autograd(modulated: bool, channels_last: bool, autocast: bool):
    """The recomputing GroupNorm(+modulation)+SiLU gives autograd's values and gradients (input,
    affine weight and bias, scale, shift) and keeps the memory layout; under bf16 autocast (the
    checkpoint route) the values, dtypes and gradients are autocast's too."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16, affine=not modulated)
    if not modulated:
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(3, 16, 5, 7)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    scale, shift = (torch.randn(3, 16, 1, 1), torch.randn(3, 16, 1, 1)) if modulated else (None, None)
    g = torch.randn(3, 16, 5, 7)
    results = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, scale, shift)]
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = leaves[0].to(torch.bfloat16) if autocast else leaves[0]
            out = norm_modulate_silu(norm, h, *leaves[1:], recompute=recompute)
        out.backward(g)
        grads = [t.grad for t in leaves if t is not None] + [p.grad for p in norm.parameters()]
        results.append((out, grads))
    (ref, ref_grads), (got, got_grads) = results
    assert got.dtype == ref.dtype
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(ref_grads) == 3
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_recompute_norms_keeps_fewer_activations():
    kw = inputs(B=4)
    stored = saved_bytes(build(tiny_config()).train(), kw)
    recomputed = saved_bytes(build(tiny_config(recompute_norms=True)).train(), kw)
    assert recomputed < 0.85 * stored, (recomputed, stored)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_naive_softmax(channels_last: bool):
    torch.manual_seed(0)
    C, heads, S = 32, 4, 5
    block = AttentionBlock(C, num_head_channels=8, num_groups=8, context_dim=24)
    randomize_zero_init(block)
    x = torch.randn(2, C, 4, 6)
    context = torch.randn(2, S, 24)
    mask = torch.tensor([[True, False, True, False, False], [True] * S])
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = block(xin, Conditioning(torch.zeros(2, 1), context, mask))

    d = C // heads
    tok = block.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
    q, k, v = (tok @ block.qkv.weight.T + block.qkv.bias).split(C, dim=-1)
    ck, cv = (context @ block.context_kv.weight.T + block.context_kv.bias).split(C, dim=-1)
    k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)  # (B, S + T, C)
    split = lambda z: z.reshape(2, z.shape[1], heads, d).transpose(1, 2)  # (B, h, N, d)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)  # (B, h, T, S + T)
    visible = torch.cat([mask, torch.ones(2, 24, dtype=torch.bool)], 1)[:, None, None]
    attn = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    heads_out = (attn @ split(v)).transpose(1, 2).reshape(2, 24, C)
    ref = x + (heads_out @ block.proj.weight.T + block.proj.bias).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cross_attention_block_matches_naive_softmax():
    """self_attention=False: each position attends to the (masked) context tokens only."""
    torch.manual_seed(0)
    C, heads, S = 16, 2, 4
    block = randomize_zero_init(AttentionBlock(C, num_head_channels=8, num_groups=8, context_dim=12, self_attention=False))
    assert block.qkv.weight.shape == (C, C)  # queries only
    x, context = torch.randn(2, C, 3, 5), torch.randn(2, S, 12)
    mask = torch.tensor([[False, True, True, False], [True] * S])
    out = block(x, Conditioning(torch.zeros(2, 1), context, mask))
    d, T = C // heads, 15
    q = block.norm(x).flatten(2).transpose(1, 2) @ block.qkv.weight.T + block.qkv.bias  # (B, T, C)
    ck, cv = (context @ block.context_kv.weight.T + block.context_kv.bias).split(C, dim=-1)
    split = lambda z: z.reshape(2, z.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    scores = (split(q) @ split(ck).transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask[:, None, None], float("-inf"))
    heads_out = (scores.softmax(-1) @ split(cv)).transpose(1, 2).reshape(2, T, C)
    ref = x + (heads_out @ block.proj.weight.T + block.proj.bias).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        AttentionBlock(C, num_head_channels=8, num_groups=8, self_attention=False)


def test_position_embedding_2d_closed_form():
    """Row r, column c of a W-wide grid: [cos(r f), sin(r f), cos(c f), sin(c f)], f_i = 10000^(-i/(D/4))."""
    H, W, D = 3, 5, 16
    emb = position_embedding_2d(H, W, D)
    assert emb.shape == (H * W, D)
    f = 10000.0 ** (-torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    for r, c in [(0, 0), (1, 4), (2, 3)]:
        ref = torch.cat([torch.cos(r * f), torch.sin(r * f), torch.cos(c * f), torch.sin(c * f)]).float()
        torch.testing.assert_close(emb[r * W + c], ref, rtol=0, atol=1e-6)
    assert len({tuple(row.tolist()) for row in emb}) == H * W  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        position_embedding_2d(2, 2, 6)


def test_attention_positions_tell_left_from_right():
    """Without positions, self-attention is equivariant to a mirror of the grid (what it sees from the
    left it sees from the right); with them it is not, and it equals attention over tokens + the
    2-D embedding."""
    torch.manual_seed(0)
    C, x, cond = 16, torch.randn(2, 16, 4, 6), Conditioning(torch.zeros(2, 1), torch.randn(2, 3, 12))
    plain = randomize_zero_init(AttentionBlock(C, num_head_channels=8, num_groups=8, context_dim=12))
    placed = AttentionBlock(C, num_head_channels=8, num_groups=8, context_dim=12, positions=True)
    placed.load_state_dict(plain.state_dict())  # no parameters of its own
    mirror = lambda z: z.flip(-1)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(plain(mirror(x), cond), mirror(plain(x, cond)), rtol=1e-5, atol=1e-5)
        assert (placed(mirror(x), cond) - mirror(placed(x, cond))).abs().max() > 1e-3
        # the same block on the tokens shifted by the embedding, with GroupNorm made the identity
        shifted = x + position_embedding_2d(4, 6, C).T.reshape(1, C, 4, 6)
        plain.norm = placed.norm = nn.Identity()
        torch.testing.assert_close(placed(x, cond), plain(shifted, cond) - shifted + x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        AttentionBlock(18, num_head_channels=9, num_groups=9, positions=True)


def test_attention_positions_config_reaches_every_attention_block():
    model = UNet(tiny_config(attention_positions=True))
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(b.positions for b in blocks)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in UNet(tiny_config()).parameters())
    with pytest.raises(ValueError, match="attention_positions"):
        tiny_config(attention_positions=True, model_channels=18, num_groups=9, num_head_channels=9)


def test_cross_attention_resolutions_let_the_top_level_read_the_caption():
    """With the 16 px self-attention and the pooled caption cut off, a caption token reaches the
    output through the 32 px cross-attention blocks, and through nothing else."""
    model = build(tiny_config(cross_attention_resolutions=(32,)))
    crosses = [m for m in model.modules() if isinstance(m, AttentionBlock) and not m.self_attention]
    assert len(crosses) == 3  # one down block and two up blocks at the 32 px level
    assert sum(isinstance(m, AttentionBlock) for m in build(tiny_config()).modules()) + 3 == \
        sum(isinstance(m, AttentionBlock) for m in model.modules())
    silence = lambda *layers: [torch.nn.init.zeros_(p) for layer in layers for p in layer.parameters()]  # noqa: E731
    silence(model.conditioner.text_to_emb, *(m.proj for m in model.modules() if isinstance(m, AttentionBlock) and m.self_attention))
    kw = inputs()
    changed = kw["text_tokens"].clone()
    changed[1, 0] += 1.0
    with torch.no_grad():
        a, b = run(model, kw), run(model, kw, text_tokens=changed)
        silence(*(m.proj for m in crosses))
        c, d = run(model, kw), run(model, kw, text_tokens=changed)
    assert (a[1] - b[1]).abs().max() > 1e-4 and torch.equal(a[0], b[0])
    assert torch.equal(c, d)
    with pytest.raises(ValueError, match="cross_attention_resolutions"):
        UNet(tiny_config(cross_attention_resolutions=(32,), image_embed_dim=None, text_embed_dim=None))


def test_channels_last_input_gives_same_output():
    model, kw = build(tiny_config()), inputs()
    with torch.no_grad():
        base = run(model, kw)
        cl = run(model.to(memory_format=torch.channels_last), kw,
                 x=kw["x"].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, base, rtol=1e-4, atol=1e-5)


def test_unconditional_model():
    model = build(tiny_config(image_embed_dim=None, text_embed_dim=None))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
        ignored = model(x, t, drop_image=torch.tensor([True, False]))  # CFG masks are no-ops
    assert out.shape == x.shape
    torch.testing.assert_close(ignored, out, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model(x, t, image_embed=torch.randn(2, IMG_DIM))
    with pytest.raises(ValueError):
        model(x, t, text_tokens=torch.randn(2, L, TXT_DIM))


def test_all_parameters_get_finite_gradients():
    model = build(tiny_config()).train()
    kw = inputs()
    run(model, kw, drop_image=torch.tensor([True, False]), drop_text=torch.tensor([False, True])
        ).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_config_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--net", type=SuperResUNet)
    cfg = parser.parse_string(
        "net:\n  class_path: modules.networks.superres_unet.SuperResUNet\n  init_args:\n"
        "    config:\n      image_size: 32\n      model_channels: 16\n      channel_mult: [1, 2]\n"
        "      num_res_blocks: 1\n      interpolation: BILINEAR\n"
    )
    net = parser.instantiate_classes(cfg).net
    assert isinstance(net, SuperResUNet)
    assert net.config.channel_mult == (1, 2) and net.config.interpolation is Interpolation.BILINEAR
    assert net.config.attention_resolutions == () and net.config.low_res_channels == 3


# ------------------------------------------------------------------------ upsampler
def sr_config(**overrides) -> SuperResUNetConfig:
    kwargs = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1)
    kwargs.update(overrides)
    return SuperResUNetConfig(**kwargs)


def test_superres_runs_on_crop_and_full_size():
    model = build(sr_config(), SuperResUNet)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    t, aug = torch.tensor([10, 500]), torch.tensor([0.0, 0.3])
    with torch.no_grad():
        crop = model(torch.randn(2, 3, 16, 16), t, low_res=torch.randn(2, 3, 4, 4), aug_level=aug)
        full = model(torch.randn(2, 3, 32, 32), t, low_res=torch.randn(2, 3, 8, 8), aug_level=aug)
    assert crop.shape == (2, 3, 16, 16) and full.shape == (2, 3, 32, 32)


def test_superres_depends_on_low_res_and_aug_level():
    model = build(sr_config(), SuperResUNet)
    x, t, low = torch.randn(1, 3, 16, 16), torch.tensor([100]), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        base = model(x, t, low_res=low, aug_level=torch.tensor([0.0]))
        assert (model(x, t, low_res=low) - base).abs().max() == 0  # None means level 0
        assert (model(x, t, low_res=low, aug_level=torch.tensor([0.5])) - base).abs().max() > 1e-4
        assert (model(x, t, low_res=low + 1.0) - base).abs().max() > 1e-4


def test_superres_is_translation_equivariant():
    """No attention, no positional input: with circular conv padding and nearest upsampling of the
    low-res image, shifting (x, low_res) by 8 (resp. 2) px shifts the output by exactly 8 px.
    The shift is a multiple of the total downsampling factor, so stride-2 convs line up."""
    config = sr_config(interpolation=Interpolation.NEAREST, channel_mult=(1, 2, 2))
    model = build(config, SuperResUNet)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    g = torch.Generator().manual_seed(3)
    x, low = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    t, aug = torch.tensor([250]), torch.tensor([0.2])
    with torch.no_grad():
        out = model(x, t, low_res=low, aug_level=aug)
        x_s, low_s = x.roll((8, -8), (2, 3)), low.roll((2, -2), (2, 3))
        shifted = model(x_s, t, low_res=low_s, aug_level=aug)
    torch.testing.assert_close(shifted, out.roll((8, -8), (2, 3)), rtol=1e-4, atol=1e-5)


def test_superres_gradients_finite():
    model = build(sr_config(), SuperResUNet).train()
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), low_res=torch.randn(2, 3, 8, 8),
                aug_level=torch.rand(2))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_token_id_caption_init_keeps_positions_visible():
    """CLIP's text-tower init for the U-Net's own caption embedding: tokens N(0, 0.02²), positions
    N(0, 0.01²). One word at two positions then differs by about half as much as two words do, so
    which object a word belongs to is visible from the first step (N(0, 1) tokens made it 1:100)."""
    torch.manual_seed(0)
    cond = UNet(tiny_config(text_embed_dim=None, text_vocab_size=1000, context_dim=64, text_max_length=16)).conditioner
    words = cond.token_embedding.weight.detach()
    positions = cond.positional_embedding.detach()
    word_gap = (words[:500] - words[500:]).norm(dim=1).mean()
    position_gap = (positions[:8] - positions[8:]).norm(dim=1).mean()
    assert 0.35 < float(position_gap / word_gap) < 0.65


def test_token_id_caption_embeds_ids_and_keeps_null_and_padding_invariants():
    """``text_vocab_size``: the U-Net embeds the caption's token ids itself (GLIDE). Context entry i of
    the caption is E[id_i] + P[i] (normalised); padding ids and a dropped caption's ids do not matter."""
    config = tiny_config(text_embed_dim=None, text_vocab_size=50, text_max_length=L)
    model, kw = build(config), inputs()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, L), generator=g)
    kw = {**kw, "text_tokens": None, "text_ids": ids}
    emb = model.embed_timestep(kw["t"])
    with torch.no_grad():
        ctx = model.conditioner(emb, kw["image_embed"], None, kw["text_mask"], text_ids=ids).context
        first = config.num_image_tokens + 1  # image tokens, null token, caption tokens
        cond = model.conditioner
        expected = cond.context_norm(cond.token_embedding(ids) + cond.positional_embedding[:L])
        torch.testing.assert_close(ctx[:, first:], expected, rtol=0, atol=1e-6)
        other = ids.clone()
        other[1, 1] = (ids[1, 1] + 1) % 50  # a real token of sample 1
        other[0, 3:] = (ids[0, 3:] + 7) % 50  # sample 0's padding
        base, moved = run(model, kw), run(model, kw, text_ids=other)
        assert (moved[1] - base[1]).abs().max() > 1e-4
        torch.testing.assert_close(moved[0], base[0], rtol=0, atol=1e-6)
        drop = torch.tensor([False, True])
        torch.testing.assert_close(run(model, kw, text_ids=other, drop_text=drop)[1],
                                   run(model, kw, drop_text=drop)[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pass text_ids, not text_tokens"):
        run(model, kw, text_tokens=torch.randn(2, L, TXT_DIM), text_ids=None)
    with pytest.raises(ValueError, match="text_max_length"):
        run(model, kw, text_ids=torch.zeros(2, L + 1, dtype=torch.long), text_mask=torch.ones(2, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_vocab_size is None"):
        run(build(tiny_config()), inputs(), text_ids=ids)
    with pytest.raises(Exception, match="text_embed_dim"):
        tiny_config(text_vocab_size=50)  # both a frozen encoder's width and ids
