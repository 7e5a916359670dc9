"""Every stage trains with `strategy: ddp` on 2 CPU processes (gloo) from its tiny YAML.

One `torchrun --nproc_per_node 2` launch trains all stages (`tests/ddp_probe.py`, 2 epochs each,
2 loader workers per rank, started by a forkserver); the single-process reference runs here at the same global batch
(16 = 2 ranks x 8). Both runs use the production draws (t, ε, CFG dropout masks, upsampler crops
and corruption levels from `modules.core.draws`). Checked per stage: the two ranks draw different
values, whose concatenation is what the single process drew; the first two steps' losses and
all-reduced gradients match the single-process ones; every sample is seen exactly once per epoch
across 2 ranks x 2 workers (non-resampled mode); CLIP's loss is computed on features gathered
from both ranks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ddp_probe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["clip", "prior", "ar_prior", "decoder", "superres"]
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # measured with the production draws: ≤ 2e-7 (loss), ≤ 1e-6 (gradient) relative


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = ddp_probe.write_probe_data(root / "data")
    out = root / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_probe.py"), "--data", str(root / "data"), "--out", str(out),
           "--stages", *STAGES, "clip_nograd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = {s: [torch.load(out / f"{s}-rank{r}.pt", weights_only=True) for r in range(2)] for s in [*STAGES, "clip_nograd"]}
    torch.set_num_threads(1)
    single = {s: ddp_probe.run_stage(s, data, root / "single", devices=1, batch_size=2 * ddp_probe.PER_SHARD,
                                     workers=0, max_epochs=1) for s in [*STAGES, "clip_nograd"]}
    return {"ddp": ddp, "single": single}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("stage", STAGES)
def test_ddp_matches_single_process_at_equal_global_batch(runs: dict, stage: str) -> None:
    ranks, single = runs["ddp"][stage], runs["single"][stage]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rows = []
    for step in range(2):
        assert single["keys"][step] == ranks[0]["keys"][step] + ranks[1]["keys"][step], "rank 0's rows first"
        ddp_loss = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2  # DDP averages gradients of rank means
        err = rel_err(ranks[0]["grads"][step], single["grads"][step])
        assert torch.equal(ranks[0]["grads"][step], ranks[1]["grads"][step]), "all-reduced gradients agree on both ranks"
        assert ddp_loss == pytest.approx(single["losses"][step], rel=LOSS_RTOL)
        assert err < GRAD_RTOL
        loss_err = abs(ddp_loss - single["losses"][step]) / abs(single["losses"][step])
        rows.append(f"{stage:9s} step {step}: loss single {single['losses'][step]:.7f} ddp {ddp_loss:.7f} (rel err {loss_err:.1e})"
                    f" | grad rel err {err:.1e}")
    print("\n" + "\n".join(rows))


@pytest.mark.parametrize("stage", STAGES)
def test_each_rank_draws_its_own_randomness(runs: dict, stage: str) -> None:
    """The production draws of every step (`modules.core.draws`, recorded in call order) differ
    between the two ranks and from step to step, and side by side they are exactly the rows the
    single process drew at the same step. The global torch generator (for randomness not routed
    through `draws`) is seeded per (seed, rank, batch): different per rank, rank 0 = 1 process."""
    ranks, single = runs["ddp"][stage], runs["single"][stage]
    steps = len(ranks[0]["rng"])
    assert steps >= 2 and len(set(ranks[0]["rng"])) == steps
    assert all(a != b for a, b in zip(ranks[0]["rng"], ranks[1]["rng"]))
    assert ranks[0]["rng"][: len(single["rng"])] == single["rng"][:steps]

    per_step = [len(d) for r in (*ranks, single) for d in r["draws"]]
    if stage == "clip":
        assert set(per_step) == {0}, "CLIP training draws nothing"
        return
    assert len(set(per_step)) == 1 and per_step[0] > 0, f"every step of every run makes the same draws: {per_step}"
    for step in range(steps):
        ours, theirs = ranks[0]["draws"][step], ranks[1]["draws"][step]
        assert all(not torch.equal(a, b) for a, b in zip(ours, theirs)), f"step {step}: a draw repeats across ranks"
        if step > 0:
            assert all(not torch.equal(a, b) for a, b in zip(ours, ranks[0]["draws"][step - 1])), f"step {step} repeats"
        if step < len(single["draws"]):
            for k, whole in enumerate(single["draws"][step]):
                assert torch.equal(torch.cat([ours[k], theirs[k]]), whole), f"step {step}, draw {k}"
    first = [(tuple(d.shape), d.dtype) for d in ranks[0]["draws"][0]]
    print(f"\n{stage}: {per_step[0]} draws per step {first}; step 0, draw 0 rank 0 {ranks[0]['draws'][0][0][:4].tolist()} "
          f"rank 1 {ranks[1]['draws'][0][0][:4].tolist()}")


@pytest.mark.parametrize("stage", STAGES)
def test_every_sample_once_per_epoch_across_ranks_and_workers(runs: dict, stage: str) -> None:
    ranks = runs["ddp"][stage]
    expected = sorted(k for step in runs["single"][stage]["keys"] for k in step)
    assert len(expected) == ddp_probe.NUM_SHARDS * ddp_probe.PER_SHARD
    for epoch in (0, 1):
        seen = [k for r in ranks for e, keys in zip(r["epochs"], r["keys"]) if e == epoch for k in keys]
        assert sorted(seen) == expected, f"epoch {epoch}: every sample exactly once over 2 ranks x 2 workers"
    orders = [[k for e, keys in zip(ranks[0]["epochs"], ranks[0]["keys"]) if e == epoch for k in keys] for epoch in (0, 1)]
    assert orders[0] != orders[1], "the shard order is reshuffled per epoch"


def test_clip_loss_uses_features_gathered_across_ranks(runs: dict) -> None:
    """Each rank's contrastive loss is the full 16 x 16 loss (not its local 8 x 8 one), so both
    ranks report the single-process value; with `gather_with_grad: false` open_clip only
    backpropagates into local features and the averaged gradient is exactly half as large."""
    single = runs["single"]["clip"]["losses"][0]
    for rank in runs["ddp"]["clip"]:
        assert rank["losses"][0] == pytest.approx(single, rel=LOSS_RTOL)
    nograd = runs["ddp"]["clip_nograd"][0]["grads"][0]
    ratio = float(nograd.norm() / runs["single"]["clip_nograd"]["grads"][0].norm())
    print(f"\nclip gathered loss {runs['ddp']['clip'][0]['losses'][0]:.7f} = single {single:.7f}; "
          f"gather_with_grad=false gradient / single = {ratio:.4f}")
    assert ratio == pytest.approx(0.5, abs=0.01)


def test_sigterm_under_ddp_saves_last_ckpt_on_both_ranks_exit(tmp_path: Path) -> None:
    """Pre-emption of a 2-process run: both ranks get SIGTERM after step 3 (as SLURM / torchrun
    deliver it to every task); Lightning stops both at the batch boundary, `PreemptionCheckpoint`
    writes last.ckpt (step 3) and the run ends with a SIGTERM status."""
    shards = ddp_probe.write_embedding_shards(tmp_path / "emb", shards=4, per_shard=16)
    (tmp_path / "callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n      init_args: {decay: 0.9}\n"
        f"    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: {{dirpath: {tmp_path / 'ckpt'}, save_last: true, every_n_train_steps: 2}}\n"
        "    - class_path: tests.ddp_probe.StepLog\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "modules.cli", "fit",
           "--config", str(ROOT / "experiments/prior/tiny.yaml"), "--config", str(tmp_path / "callbacks.yaml"),
           "--data.train_shards", shards, "--data.val_shards=null", "--data.loader.batch_size=8", "--data.loader.num_workers=0",
           "--model.clip_weights=null", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.max_steps=40", "--trainer.max_time=null", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "UNCLIP_SIGNAL_AT": "3:TERM"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and proc.stderr.count("stopped by SIGTERM") == 2, proc.stderr[-3000:]
    # torchrun's summary lists the first failed worker (exit 128 + SIGTERM). The other worker either
    # exited the same way or, if it was still shutting down when torchrun tore the group down, was
    # ended by torchrun's own SIGTERM (-15). Both are SIGTERM; any other status is a failure.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "143" in codes and set(codes) <= {"143", "-15"}, codes
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3, "the periodic checkpoint was at step 2"


def test_uneven_shards_over_ranks_stop_in_one_line_instead_of_hanging(tmp_path: Path) -> None:
    """3 shards over 2 ranks without resampling: rank 1 would run out first and the other rank wait
    for it forever in the next all-reduce (DALLE2-pytorch PR #121). Both ranks refuse before
    training, each with one line naming the key; with resampling the same shards train."""
    shards = ddp_probe.write_embedding_shards(tmp_path / "emb", shards=3, per_shard=16)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "modules.cli", "fit",
            "--config", str(ROOT / "experiments/prior/tiny.yaml"), "--data.train_shards", shards, "--data.val_shards=null",
            "--data.loader.batch_size=8", "--data.loader.num_workers=0", "--model.clip_weights=null",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_time=null",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=null",
            f"--trainer.default_root_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*base, "--data.resampled=false", "--trainer.max_steps=40"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("unclip fit: error:")]
    assert proc.returncode != 0 and len(lines) == 2, proc.stderr[-3000:]
    assert all("data.train_shards: 3 shards cannot be dealt evenly over 2 ranks" in line for line in lines)
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith('File "') and "site-packages" not in line
              and "<frozen" not in line]
    assert frames == [], frames  # no traceback from the ranks (torchrun reports their exit 2 its own way)
    ok = subprocess.run([*base, "--data.resampled=true", "--data.epoch_samples=32", "--trainer.max_steps=4"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
