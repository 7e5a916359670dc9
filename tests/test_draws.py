"""Training draws keyed by (seed, step): rank slices of a global draw (`modules.core.draws`).

No processes: ranks are simulated by `begin_step(seed, step, rank, world_size)`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks.checkpointing import RNGState
from modules.core import draws
from modules.diffusion.config import DiffusionConfig
from modules.stages.degradations import Augmentation, DegradationConfig

B = 4  # local batch


def step_draws(seed: int, step: int, rank: int, world: int, batch: int) -> list[torch.Tensor]:
    """One training step's sequence of draws (every kind, batch dimension first) on `rank`."""
    draws.begin_step(seed, step, rank, world)
    try:
        return [
            draws.integers(0, 1000, (batch,)),
            draws.uniform((batch,)),
            draws.normal((batch, 3, 5, 5), dtype=torch.float64),
            draws.normal((batch, 3, 64, 64)),  # large rows: one generator per global row
            draws.uniform((batch, 2)),
            draws.uniform(()),  # one value per global batch
        ]
    finally:
        draws.end_step()


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_concatenate_to_the_one_process_draw(world: int) -> None:
    single = step_draws(0, 7, 0, 1, world * B)
    ranks = [step_draws(0, 7, r, world, B) for r in range(world)]
    for k, whole in enumerate(single[:-1]):
        assert all(r[k].shape == (B, *whole.shape[1:]) for r in ranks)
        assert torch.equal(torch.cat([r[k] for r in ranks]), whole), f"draw {k}"
        assert not torch.equal(ranks[0][k], ranks[1][k]), f"draw {k}: ranks must differ"
    assert all(torch.equal(r[-1], single[-1]) for r in ranks), "a scalar draw is shared by all ranks"


def test_steps_seeds_and_call_order_key_the_draws() -> None:
    base = step_draws(0, 7, 1, 2, B)
    assert all(torch.equal(a, b) for a, b in zip(base, step_draws(0, 7, 1, 2, B))), "a pure function of the key"
    for other in (step_draws(0, 8, 1, 2, B), step_draws(1, 7, 1, 2, B)):
        assert not any(torch.equal(a, b) for a, b in zip(base, other))
    assert not torch.equal(base[1], base[3][:, 0]), "successive draws of a step come from different keys"


def test_outside_a_step_the_global_generator_draws_and_a_generator_wins() -> None:
    assert draws.active() is None
    torch.manual_seed(3)
    expected = torch.rand(B), torch.randn(B, 2), torch.randint(0, 9, (B,))
    torch.manual_seed(3)
    got = draws.uniform((B,)), draws.normal((B, 2)), draws.integers(0, 9, (B,))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    step = draws.begin_step(0, 1, 1, 2)
    try:
        explicit = draws.normal((B, 2), generator=torch.Generator().manual_seed(5))
        assert step.calls == 0, "an explicit generator does not consume the step's draws"
    finally:
        draws.end_step()
    assert torch.equal(explicit, torch.randn(B, 2, generator=torch.Generator().manual_seed(5)))


def training_draw_sites(batch: int) -> list[torch.Tensor]:
    """The production training draws of the diffusion code and the BSR upsampler corruption."""
    diffusion = DiffusionConfig(timesteps=50).build()
    t = diffusion.sample_timesteps(batch)
    x0 = torch.zeros(batch, 3, 8, 8)
    noised = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, t)["mse"]  # = ε² means: the ε draw
    bsr = DegradationConfig(kind=Augmentation.BSR)(x0, torch.ones(batch))
    return [t, noised, bsr]


def test_production_sites_draw_rank_rows_of_the_one_process_step() -> None:
    def run(rank: int, world: int, batch: int) -> list[torch.Tensor]:
        draws.begin_step(0, 3, rank, world)
        try:
            return training_draw_sites(batch)
        finally:
            draws.end_step()

    single, ranks = run(0, 1, 2 * B), [run(r, 2, B) for r in range(2)]
    for k, whole in enumerate(single):
        torch.testing.assert_close(torch.cat([r[k] for r in ranks]), whole, rtol=0, atol=1e-6)
        assert not torch.equal(ranks[0][k], ranks[1][k])


def test_rng_state_callback_opens_the_step_with_its_batch_number_and_closes_it() -> None:
    progress = SimpleNamespace(total=SimpleNamespace(ready=12))
    strategy = SimpleNamespace(distributed_sampler_kwargs={"rank": 1, "num_replicas": 2})
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
                              global_rank=1, strategy=strategy)
    callback = RNGState(seed=5)
    callback.on_train_batch_start(trainer, None, None, 0)
    step = draws.active()
    assert step is not None and (step.seed, step.step, step.rank, step.world_size) == (5, 12, 1, 2)
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert draws.active() is None


def test_large_rows_are_drawn_per_row_without_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of ≥ ROW_KEYED_NUMEL numbers: each rank draws B rows only (not W·B), same values."""
    shapes: list[tuple[int, ...]] = []
    original = torch.randn

    def recording(*args, **kwargs):
        shapes.append(tuple(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", recording)
    draws.begin_step(0, 3, 1, 8)
    try:
        rows = draws.normal((B, 3, 64, 64))
    finally:
        draws.end_step()
    assert rows.shape == (B, 3, 64, 64) and all(s == (3, 64, 64) for s in shapes) and len(shapes) == B
    draws.begin_step(0, 3, 0, 1)  # the 1-process run of the same step: rank 1 of 8 holds rows B..2B
    try:
        whole = draws.normal((8 * B, 3, 64, 64))
    finally:
        draws.end_step()
    assert torch.equal(rows, whole[B : 2 * B])
