"""Resume after a crash: atomic checkpoints, exact data position, RNG streams, SIGTERM/SIGKILL.

The end-to-end runs use the prior's tiny YAML (EMA callback, AdamW + warmup, validation that
samples) on embedding shards in non-resampled mode (6 steps per epoch, 1 loader worker, sample
shuffle on), `ModelCheckpoint(every_n_train_steps=5, save_last=True)` and a step log
(`tests.ddp_probe.StepLog`). A resumed run must reproduce the uninterrupted run step for step:
same samples, same random draws, same LR, same losses, and the same final weights, EMA weights
and optimizer state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO
from datamodules.embeddings import EmbeddingDataModule
from datamodules.image_text import LoaderConfig
from datamodules.image_text import FETCH_AHEAD
from modules.cli import main as cli
from tests import ddp_probe

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, MAX_STEPS = 6, 24


# ---------------------------------------------------------------------------------------------
# The data position
# ---------------------------------------------------------------------------------------------
def _embedding_dm(pattern: str, **kw) -> EmbeddingDataModule:
    dm = EmbeddingDataModule(train_shards=pattern, shuffle_buffer=16, seed=1, **kw, loader=LoaderConfig(batch_size=8, num_workers=1))
    dm.setup("fit")
    return dm


def _keys(batches) -> list[list[str]]:
    return [list(b["key"]) for b in batches]


@pytest.mark.parametrize("resampled", [False, True])
def test_loader_state_replays_the_rest_of_the_epoch_exactly(tmp_path: Path, resampled: bool):
    pattern = ddp_probe.write_embedding_shards(tmp_path, shards=4, per_shard=12)
    kw = {"resampled": True, "epoch_samples": 48} if resampled else {}
    reference = _embedding_dm(pattern, **kw).train_dataloader()
    epochs = [_keys(reference), _keys(reference)]  # epoch 0, epoch 1
    assert epochs[0] != epochs[1], "each epoch draws a new order (and new shards when resampling)"
    loader = _embedding_dm(pattern, **kw).train_dataloader()
    list(loader)  # epoch 0
    it = iter(loader)
    for _ in range(3 + FETCH_AHEAD):  # the training loop has consumed 3 batches and holds a 4th
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3, "complete": False}
    resumed = _embedding_dm(pattern, **kw).train_dataloader()
    resumed.load_state_dict(state)
    assert _keys(resumed) == epochs[1][3:], "the resumed pass is the rest of epoch 1, in order"


def test_loader_state_at_the_end_of_an_epoch_starts_the_next(tmp_path: Path):
    pattern = ddp_probe.write_embedding_shards(tmp_path, shards=4, per_shard=12)
    loader = _embedding_dm(pattern).train_dataloader()
    first = _keys(loader)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": len(first), "complete": True}
    second = _keys(loader)
    resumed = _embedding_dm(pattern).train_dataloader()
    resumed.load_state_dict(state)
    assert _keys(resumed) == second


# ---------------------------------------------------------------------------------------------
# Atomic writes and RNG streams
# ---------------------------------------------------------------------------------------------
class Explodes:
    """Pickling this raises after torch.save has already written part of the file."""

    def __reduce__(self):
        raise RuntimeError("simulated crash mid-write")


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(100_000), "boom": Explodes()}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


def test_lightning_default_writer_stages_outside_the_checkpoint_folder(tmp_path: Path, monkeypatch):
    """Why `AtomicCheckpointIO` exists: Lightning 2.6.6's `TorchCheckpointIO` writes its temporary
    file through fsspec into $TMPDIR and then moves it (a copy across filesystems)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    import tempfile

    staged: list[str] = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        staged.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    target = tmp_path / "ckpts" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"a": 1}, target)
    assert staged and all(Path(p).parent != target.parent for p in staged)
    staged.clear()
    AtomicCheckpointIO().save_checkpoint({"a": 1}, target)
    assert staged and all(Path(p).parent == target.parent for p in staged)


# ---------------------------------------------------------------------------------------------
# End-to-end: SIGTERM (in process) and SIGKILL (subprocess)
# ---------------------------------------------------------------------------------------------
def run_files(root: Path) -> tuple[list[str], Path]:
    data = ddp_probe.write_embedding_shards(root / "data", shards=4, per_shard=12)
    val = ddp_probe.write_embedding_shards(root / "val", shards=1, per_shard=8, seed=1)
    callbacks = root / "callbacks.yaml"
    callbacks.write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
              init_args: {{decay: 0.9}}
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {root / 'ckpt'}, save_last: true, every_n_train_steps: 5}}
            - class_path: tests.ddp_probe.StepLog
        """))
    args = [
        "fit", "--config", str(ROOT / "experiments/prior/tiny.yaml"), "--config", str(callbacks),
        "--data.train_shards", data, "--data.val_shards", val, "--data.loader.batch_size=8", "--data.loader.num_workers=1",
        "--data.resampled=false", "--data.shuffle_buffer=16", "--data.val_samples=8", "--model.clip_weights=null",
        "--model.sampling.steps=4", "--model.optimizer.warmup_steps=10", f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.max_time=null", f"--trainer.val_check_interval={STEPS_PER_EPOCH}", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    return args, root / "ckpt"


def test_ctrl_c_stops_at_the_step_boundary_and_saves_like_sigterm(tmp_path: Path, monkeypatch, capsys):
    """SIGINT takes SIGTERM's path: the step it arrived in finishes, last.ckpt holds that step."""
    args, ckpt = run_files(tmp_path)
    monkeypatch.setenv("UNCLIP_SIGNAL_AT", "6:INT")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI and nohup ignore SIGINT)
    try:
        assert cli.main(args) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    finally:
        signal.signal(signal.SIGINT, before)
    assert "stopped by SIGTERM or Ctrl-C" in capsys.readouterr().err
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 6


def test_sigterm_saves_a_checkpoint_then_exits_143_and_resumes(tmp_path: Path, monkeypatch, capsys):
    args, ckpt = run_files(tmp_path)
    monkeypatch.setenv("UNCLIP_STEPLOG", str(tmp_path / "term.jsonl"))
    monkeypatch.setenv("UNCLIP_SIGNAL_AT", "7:TERM")
    assert cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    saved = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7, "the periodic checkpoint was at step 5; SIGTERM saved step 7"
    monkeypatch.setenv("UNCLIP_STEPLOG", str(tmp_path / "resumed.jsonl"))
    monkeypatch.delenv("UNCLIP_SIGNAL_AT")
    assert cli.main([*args, "--trainer.max_steps=9", "--ckpt_path", "last"]) == 0
    first = ddp_probe.read_steplog(tmp_path / "term.jsonl")
    resumed = ddp_probe.read_steplog(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [8, 9] and resumed[8]["epoch"] == 1 and resumed[8]["batch_idx"] == 1
    assert not set(resumed[8]["keys"]) & set(first[7]["keys"]), "no batch of the epoch is trained twice"


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **env}
    return subprocess.run([sys.executable, "-m", "modules.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_mid_run_then_ckpt_path_last_continues_the_uninterrupted_run(tmp_path: Path):
    ref_args, ref_ckpt = run_files(tmp_path / "reference")
    run_args, run_ckpt = run_files(tmp_path / "killed")
    ref = _spawn(ref_args, {"UNCLIP_STEPLOG": str(tmp_path / "ref.jsonl"), "UNCLIP_FINAL_CKPT": str(tmp_path / "ref-final.ckpt")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _spawn(run_args, {"UNCLIP_STEPLOG": str(tmp_path / "killed.jsonl"), "UNCLIP_SIGNAL_AT": "17:KILL"})
    assert killed.returncode == -signal.SIGKILL
    last = torch.load(run_ckpt / "last.ckpt", weights_only=True)
    assert last["global_step"] == 15, "the last periodic checkpoint before the kill at step 17"
    resumed = _spawn([*run_args, "--ckpt_path", "last"],
                     {"UNCLIP_STEPLOG": str(tmp_path / "resumed.jsonl"), "UNCLIP_FINAL_CKPT": str(tmp_path / "resumed-final.ckpt")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b, c = (ddp_probe.read_steplog(tmp_path / f"{n}.jsonl") for n in ("ref", "killed", "resumed"))
    assert sorted(b) == list(range(1, 18)) and sorted(c) == list(range(16, MAX_STEPS + 1))
    lines = ["step  epoch  batch  loss(uninterrupted)  loss(killed)  loss(resumed)"]
    for step in range(1, MAX_STEPS + 1):
        row = b.get(step) or c[step]
        assert row["draws"] is not None, "the prior's t, drop mask and noise go through modules.core.draws"
        for field in ("keys", "rng", "draws", "epoch", "batch_idx", "lr"):
            assert row[field] == a[step][field], f"step {step}: {field} differs from the uninterrupted run"
        assert row["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-7)
        lines.append(f"{step:4d}  {a[step]['epoch']:5d}  {a[step]['batch_idx']:5d}  {a[step]['loss']:19.6f}  "
                     f"{b[step]['loss'] if step in b else float('nan'):12.6f}  {c[step]['loss'] if step in c else float('nan'):13.6f}")
    print("\nSIGKILL at step 17, last.ckpt at step 15, resumed with --ckpt_path last:\n" + "\n".join(lines))

    final_a = torch.load(tmp_path / "ref-final.ckpt", weights_only=True)
    final_c = torch.load(tmp_path / "resumed-final.ckpt", weights_only=True)
    assert final_a["global_step"] == final_c["global_step"] == MAX_STEPS
    for part in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        for name, value in final_a[part].items():
            torch.testing.assert_close(final_c[part][name], value, rtol=1e-5, atol=1e-7, msg=f"{part}.{name}")
    opt_a, opt_c = final_a["optimizer_states"][0]["state"], final_c["optimizer_states"][0]["state"]
    for index, moments in opt_a.items():
        for key, value in moments.items():
            torch.testing.assert_close(opt_c[index][key], value, rtol=1e-5, atol=1e-8)
    assert final_a["lr_schedulers"] == final_c["lr_schedulers"]


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_leaves_a_corrupt_file(tmp_path: Path):
    """A writer saves 8 MB checkpoints in a loop; it is SIGKILLed at 3 different moments."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from callbacks.checkpointing import AtomicCheckpointIO
        io, step = AtomicCheckpointIO(), 0
        print("ready", flush=True)
        while True:
            step += 1
            io.save_checkpoint({{"step": step, "w": torch.full((2_000_000,), float(step))}}, {str(tmp_path / 'last.ckpt')!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if (tmp_path / "last.ckpt").exists():
            ckpt = AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
            assert bool((ckpt["w"] == ckpt["step"]).all())
    assert (tmp_path / "last.ckpt").exists()
