"""`optim.param_groups`: weight decay on parameters of 2 dims and up, none on the rest or on frozen ones.

The same rule under FSDP's 1-D shard views is checked on 2 processes in tests/test_fsdp.py.
"""

from __future__ import annotations

import pytest
from torch import nn

from modules.core import optim


def small_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))
    net.register_parameter("gain", nn.Parameter(net[3].weight.new_ones(())))  # a 0-dim scalar
    net[0].bias.requires_grad_(False)
    return net


def names_in(net: nn.Module, group: dict) -> set[str]:
    by_id = {id(p): name for name, p in net.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


def test_param_groups_decay_weights_only() -> None:
    net = small_net()
    decay, no_decay = optim.param_groups(net, 0.05)
    assert names_in(net, decay) == {"0.weight", "3.weight"}  # conv (4-D) and linear (2-D) weights
    assert names_in(net, no_decay) == {"1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "gain"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0  # "0.bias" is frozen: in neither


def test_original_ndims_of_unwrapped_parameters_are_their_own() -> None:
    net = small_net()
    assert optim.original_ndims(net) == {name: p.ndim for name, p in net.named_parameters()}


def test_fsdp_views_of_units_outside_the_module_are_reported() -> None:
    """FSDP1 marks the parameters it flattens; when `module` does not contain their FSDP unit (e.g.
    Lightning's root unit wraps the whole LightningModule) their shapes are unknown here."""
    net = small_net()
    net[3].weight._fsdp_flattened = True  # as FlatParameter marks it, without processes
    with pytest.warns(UserWarning, match=r"1 parameters \(e.g. 3.weight\) belong to FSDP units outside"):
        optim.original_ndims(net)
