"""WarmupEMA: the averaged weights follow W_n = β_n W_{n-1} + (1 - β_n) θ_n, β_n = min(β, (1+n)/(10+n))."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema import WarmupEMA, warmup_decay, warmup_ema_multi_avg_fn


def replay(trajectory: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The recurrence written out, one tensor at a time (independent of the foreach update)."""
    avg = {k: v.clone() for k, v in trajectory[0].items()}
    for n, theta in enumerate(trajectory[1:], start=1):
        beta = min(decay, (1 + n) / (10 + n))
        avg = {k: beta * avg[k] + (1 - beta) * theta[k] for k in avg}
    return avg


def test_warmup_decay_values() -> None:
    assert warmup_decay(0.995, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.995, 400) == pytest.approx(401 / 410)
    assert warmup_decay(0.995, 10**6) == 0.995  # capped: the plain EMA once warmed up


def test_averaged_model_update_matches_the_recurrence() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    net.register_buffer("count", torch.zeros((), dtype=torch.long))
    avg = AveragedModel(net, multi_avg_fn=warmup_ema_multi_avg_fn(0.9), use_buffers=True)
    trajectory = []
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.count.fill_(step)
        trajectory.append({k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()})
        avg.update_parameters(net)
    expected = replay(trajectory, 0.9)
    for k, v in expected.items():
        torch.testing.assert_close(avg.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert int(avg.module.count) == 29  # integer buffers are copied, not averaged


class Regress(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.trajectory: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.trajectory.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trajectory.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def test_fit_ends_on_the_warmed_up_average_not_on_the_init(tmp_path) -> None:
    """After a 40-step fit the model holds the warm-up average of the 40 weights it went through;
    a fixed-decay EMA at the same β would still carry β^39 = 68% of the first step's weights."""
    torch.manual_seed(0)
    x = torch.randn(320, 3)
    data = DataLoader(TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]])), batch_size=8)
    record, model = Record(), Regress()
    trainer = pl.Trainer(max_steps=40, callbacks=[record, WarmupEMA(decay=0.99)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert len(record.trajectory) == 41
    expected = replay(record.trajectory[1:], 0.99)  # the average starts as a copy of the first step's weights
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    fixed = record.trajectory[1]["net.weight"]
    for theta in record.trajectory[2:]:
        fixed = 0.99 * fixed + 0.01 * theta["net.weight"]
    final = record.trajectory[-1]["net.weight"]
    assert (model.net.weight - final).norm() < 0.5 * (fixed - final).norm()


def test_decay_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="WarmupEMA.decay"):
        WarmupEMA(decay=1.0)
