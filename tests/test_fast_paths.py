"""The speed paths (benchmarks issue) compute exactly what the plain paths compute.

Prior: the last block computing the query alone, the caption keys/values computed once and reused
without gradients (and recomputed whenever captions, drop mask or weights change).
"""

from __future__ import annotations

import torch

from modules.networks.prior_transformer import PriorConfig, PriorTransformer
from modules.networks.transformer import TransformerStack

D, W, L = 12, 10, 6
CONFIG = PriorConfig(embed_dim=D, text_width=W, width=16, depth=3, heads=2)


def prior_inputs(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 4:] = False
    return dict(x_t=torch.randn(b, D, generator=g), t=torch.randint(0, 1000, (b,), generator=g),
                text_embed=torch.randn(b, D, generator=g), text_tokens=torch.randn(b, L, W, generator=g),
                text_mask=mask, drop_text=torch.tensor([False, True, False, False])[:b])


def prior(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    return PriorTransformer(CONFIG).eval()


def test_stack_last_query_only_equals_the_full_stack():
    torch.manual_seed(0)
    stack = TransformerStack(16, 3, 2, 4.0, 0.0, False).eval()
    x = torch.randn(2, 7, 16)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, 1] = False
    full = stack(x, valid)
    assert torch.allclose(stack(x, valid, queries=1)[:, -1], full[:, -1], atol=1e-6)
    assert torch.allclose(stack(x, valid, queries=3), full[:, -3:], atol=1e-6)


def test_stack_with_prefix_keys_values_equals_the_full_stack():
    torch.manual_seed(0)
    stack = TransformerStack(16, 3, 2, 4.0, 0.0, False).eval()
    x = torch.randn(2, 9, 16)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 2:5] = False  # padding inside the prefix
    past = stack.prefix_keys_values(x[:, :5], valid[:, :5])
    full = stack(x, valid)
    assert torch.allclose(stack(x[:, 5:], valid, past=past), full[:, 5:], atol=1e-5)
    assert torch.allclose(stack(x[:, 5:], valid, queries=1, past=past)[:, -1], full[:, -1], atol=1e-5)


def test_prior_without_gradients_reuses_caption_keys_values_and_matches():
    net, kw = prior(), prior_inputs()
    reference = net(**kw)  # gradients on: the whole sequence
    with torch.no_grad():
        first = net(**kw)
        key = net._prefix_memo.key
        again = net(**dict(kw, x_t=kw["x_t"] + 1.0, t=kw["t"] // 2))  # a sampling step: same captions
        assert net._prefix_memo.key is key  # reused, not recomputed
        moved = net(**dict(kw, x_t=kw["x_t"] + 1.0, t=kw["t"] // 2)).clone()
    assert torch.allclose(first, reference, atol=1e-5)
    with torch.enable_grad():
        assert torch.allclose(net(**dict(kw, x_t=kw["x_t"] + 1.0, t=kw["t"] // 2)), again, atol=1e-5)
    assert torch.equal(moved, again)


def test_prior_memo_follows_captions_drop_mask_and_weights():
    net, kw = prior(), prior_inputs()
    with torch.no_grad():
        net(**kw)
        other = dict(kw, text_tokens=kw["text_tokens"].flip(0))
        assert torch.allclose(net(**other), _with_grad(net, other), atol=1e-5)
        dropped = dict(kw, drop_text=torch.ones(4, dtype=torch.bool))
        assert torch.allclose(net(**dropped), _with_grad(net, dropped), atol=1e-5)
        net.transformer.blocks[0].attn.qkv.weight.mul_(1.5)  # an in-place update (an optimizer step)
        assert torch.allclose(net(**kw), _with_grad(net, kw), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(**kw)
    assert low.dtype == torch.bfloat16 and net._prefix_memo.key[1]  # recomputed under autocast


def _with_grad(net: PriorTransformer, kw: dict) -> torch.Tensor:
    with torch.enable_grad():
        return net(**kw).detach()


def test_prior_gradients_reach_every_parameter_with_the_last_query_only():
    net, kw = prior(), prior_inputs()
    net.train()
    net(**kw).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_prior_memo_is_not_used_under_fresh_dropout():
    torch.manual_seed(0)
    net = PriorTransformer(PriorConfig(embed_dim=D, text_width=W, width=16, depth=2, heads=2, dropout=0.5)).train()
    kw = prior_inputs()
    with torch.no_grad():
        a, b = net(**kw), net(**kw)
    assert net._prefix_memo.value is None and not torch.allclose(a, b)  # caption dropout drawn anew each call
