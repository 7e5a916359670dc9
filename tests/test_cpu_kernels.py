"""The CPU kernel choices. The oneDNN-routed `Linear` / `Conv1x1` (modules/networks/linear.py): same
values, same gradients, same parameters as torch's layers, and the oneDNN path is really the one taken
when selected. `attention` (modules/networks/attention.py): short bf16 sequences by bf16 batched GEMMs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.networks import attention as attn
from modules.networks import linear as lin
from modules.networks.linear import Conv1x1, Linear, cpu_linear_backend, set_cpu_linear_backend
from modules.networks.unet import UNet, UNetConfig

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def backend():
    """Select a backend for one test; restore the default afterwards."""
    yield set_cpu_linear_backend
    set_cpu_linear_backend(None)


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("shape", [(4, 32, 48), (5, 37, 48), (70, 48), (3, 2, 41, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_values_and_gradients(backend, shape, bias):
    """Row counts that are and are not multiples of 16 (padded), 2-D to 4-D inputs, with/without bias."""
    backend("onednn")
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, layer.weight, layer.bias)
    assert y.shape == (*shape[:-1], 80) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    params = [layer.weight] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(y, [x, *params], grad)
    want = torch.autograd.grad(ref, [ref_x, *params], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not lin.onednn_bf16_linear(), reason="no oneDNN bf16 fused linear on this CPU / torch")
@pytest.mark.parametrize("in_out", [(48, 80), (96, 40)])  # weight gradient in either orientation
@pytest.mark.parametrize("shape", [(70,), (3, 41)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_autocast_linear_is_autocasts_f_linear_bit_for_bit(in_out, shape, bias):
    """Under CPU bf16 autocast `Linear` runs its own autograd function (fused bias, faster weight
    gradient) and gives exactly autocast's `F.linear`: output, input / weight / bias gradients."""
    k, n = in_out
    torch.manual_seed(0)
    layer = Linear(k, n, bias=bias)
    x = torch.randn(*shape, k, requires_grad=True)
    params = [layer.weight] + ([layer.bias] if bias else [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert "AutocastBf16Linear" in type(y.grad_fn).__name__
    assert y.dtype == ref.dtype == torch.bfloat16 and torch.equal(y, ref)
    grad = torch.randn_like(ref)
    got, want = (torch.autograd.grad(out, [x, *params], grad) for out in (y, ref))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and torch.equal(g, w)


def test_bf16_autocast_linear_falls_back_to_f_linear_without_native_bf16(monkeypatch):
    """On a CPU without native bf16 (AVX2 only) oneDNN cannot build a bf16 inner product at all, so
    `Linear` must fall back to autocast's `F.linear` there: same output, no fused function. (Where the
    CPU has native bf16, the fused path is the bit-for-bit test above.)"""
    monkeypatch.setattr(lin, "onednn_bf16_linear", lambda: False)
    torch.manual_seed(0)
    layer, x = Linear(48, 80), torch.randn(70, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert "AutocastBf16Linear" not in type(y.grad_fn).__name__
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@needs_onednn
def test_backend_selection_takes_the_named_kernel(backend):
    x, layer = torch.randn(256, 64), Linear(64, 64)
    backend("onednn")
    assert "aten::mkldnn_convolution" in ops_called(lambda: layer(x))
    backend("blas")
    assert "aten::mkldnn_convolution" not in ops_called(lambda: layer(x))
    backend("onednn")  # too few rows, bf16 autocast: F.linear
    assert "aten::mkldnn_convolution" not in ops_called(lambda: layer(x[: lin.MIN_ROWS - 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_backend_names_are_checked(backend, monkeypatch):
    with pytest.raises(ValueError, match="cpu linear backend"):
        backend("cublas")
    monkeypatch.setenv("UNCLIP_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="UNCLIP_CPU_LINEAR"):
        cpu_linear_backend()
    monkeypatch.setenv("UNCLIP_CPU_LINEAR", "blas")
    assert cpu_linear_backend() == "blas"


def test_auto_backend_follows_the_cpu_vendor(backend, monkeypatch):
    monkeypatch.delenv("UNCLIP_CPU_LINEAR", raising=False)
    monkeypatch.setattr(lin, "_cpu_vendor", lambda: "GenuineIntel")
    assert cpu_linear_backend() == "blas"
    monkeypatch.setattr(lin, "_cpu_vendor", lambda: "AuthenticAMD")
    expected = "onednn" if torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available() else "blas"
    assert cpu_linear_backend() == expected


def test_layers_keep_torch_parameters_and_state_dict_keys():
    ours, theirs = Linear(8, 4), nn.Linear(8, 4)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    conv = Conv1x1(8, 4)
    assert conv.weight.shape == (4, 8, 1, 1) and conv.state_dict().keys() == nn.Conv2d(8, 4, 1).state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1_matches_conv2d(backend, channels_last):
    backend("onednn")
    torch.manual_seed(0)
    conv = Conv1x1(12, 20)
    x = torch.randn(3, 12, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, [x, conv.weight], g), torch.autograd.grad(ref, [x, conv.weight], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_unet_is_the_same_function_in_either_layout_and_backend(backend):
    """channels_last + oneDNN linear layers vs NCHW + BLAS: same weights, same output and gradients."""
    torch.manual_seed(0)
    cfg = dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2), attention_resolutions=(8,),
               num_head_channels=16, image_embed_dim=32)
    ref = UNet(UNetConfig(**cfg))
    fast = UNet(UNetConfig(**cfg, channels_last=True))
    fast.load_state_dict(ref.state_dict())
    for p in fast.parameters():  # zero-initialised output layers would hide most of the network
        p.data.add_(0.02 * torch.randn_like(p))
    ref.load_state_dict(fast.state_dict())
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, emb = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]), F.normalize(torch.randn(4, 32), dim=-1)
    backend("blas")
    out_ref = ref(x, t, image_embed=emb)
    out_ref.square().mean().backward()
    backend("onednn")
    out = fast(x, t, image_embed=emb)
    out.square().mean().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("keys", [40, attn.BMM_MAX_KEYS + 8])
def test_attention_runs_short_bf16_sequences_by_bmm(keys: int):
    """Up to BMM_MAX_KEYS keys a bf16 call is the math formulation in bf16 GEMMs (softmax in fp32);
    beyond, torch's bf16 kernel. Either way: q's dtype out, gradients close to fp32 attention's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16().requires_grad_(True) for n in (keys, keys, keys))
    mask = torch.ones(keys, keys, dtype=torch.bool).tril()[None, None]
    out = attn.attention(q, k, v, attn_mask=mask)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    fp32 = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    if keys > attn.BMM_MAX_KEYS:
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    fp32.square().sum().backward()
    for t, t32 in zip((q, k, v), (q32, k32, v32)):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad.float(), t32.grad, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_bmm_path_matches_sdpa_in_fp32(with_mask: bool):
    """The bf16 path's formulation (bool or additive mask, no mask) is SDPA's: checked in fp64."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attn._attention_bmm(q, k, v, mask, 0.0), expected)
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(attn._attention_bmm(q, k, v, additive, 0.0), expected)


# ------------------------------------------------------------------------------ bf16 without native units
@pytest.mark.parametrize("precision, accelerator, native, want", [
    ("bf16-mixed", "auto", False, "32-true"),
    ("bf16-true", "cpu", False, "32-true"),
    ("bf16-mixed", "cpu", True, None),   # AVX512-BF16 / AMX: bf16 as configured
    ("32-true", "cpu", False, None),     # nothing to change
    ("bf16-mixed", "gpu", False, None),  # a GPU's bf16 does not depend on the host CPU
])
def test_bf16_trainer_runs_in_fp32_only_on_a_cpu_without_native_bf16(monkeypatch, precision, accelerator, native, want):
    from modules.cli import lightning as cli

    monkeypatch.setattr(cli, "native_bf16", lambda device_type: native)
    assert cli.precision_fallback({"precision": precision, "accelerator": accelerator}) == want


@pytest.mark.parametrize("native", [True, False])
def test_cli_builds_the_trainer_in_the_precision_this_cpu_runs(monkeypatch, tmp_path, native):
    """The demo decoder's `bf16-mixed` builds a bf16 trainer where the CPU has native bf16 and an fp32
    one where it has not (AVX2 only: bf16 an order of magnitude slower, oneDNN's bf16 linear refused)."""
    from modules.cli import lightning as cli

    monkeypatch.setattr(cli, "native_bf16", lambda device_type: native)
    built = cli.UnclipCLI(args=["--config", "experiments/prior/tiny.yaml", "--trainer.precision=bf16-mixed",
                                f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                                "--trainer.callbacks=null"], run=False)
    assert built.trainer.precision == ("bf16-mixed" if native else "32-true")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_sampling_runs_the_network_in_fp32_without_native_bf16(monkeypatch, native):
    """`autocast_model` under Precision.BF16: the network sees bf16 autocast only where bf16 is native;
    elsewhere it is the fp32 model itself (same output bit for bit)."""
    from modules.diffusion import config as dc

    monkeypatch.setattr(dc, "native_bf16", lambda device_type: native)
    seen = []

    def model(x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return x * t

    x, t = torch.randn(2, 3), torch.tensor([[2.0], [3.0]])
    out = dc.autocast_model(model, dc.Precision.BF16)(x, t)
    assert seen == [native] and out.dtype == torch.float32
    assert native or torch.equal(out, x * t)
