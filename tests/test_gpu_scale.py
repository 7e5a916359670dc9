"""benchmarks/gpu_scale.py (issue 22 §4): the GPU-sized decoder config, the FLOP and memory
arithmetic the script reports, and its CPU quick mode end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_scale, harness

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


@pytest.fixture(scope="module")
def decoder_300m() -> torch.nn.Module:
    return gpu_scale.build_stage("experiments/decoder/gpu_300m.yaml", "meta")


def test_gpu_300m_yaml_builds_a_unet_of_at_least_300m_parameters(decoder_300m: torch.nn.Module) -> None:
    unet = decoder_300m.unet
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 300e6 <= n <= 1.0e9, n
    c = unet.config
    assert (c.image_size, c.channels_last, c.use_checkpoint) == (64, True, False)
    assert decoder_300m.optim_cfg.fused


def test_gpu_300m_yaml_trains_bf16_at_batch_64_per_gpu() -> None:
    from modules.cli.lightning import UnclipCLI

    class ParseOnly(UnclipCLI):
        def instantiate_classes(self) -> None:
            pass

    cfg = ParseOnly(args=["--config", str(ROOT / "experiments/decoder/gpu_300m.yaml")], run=False).config
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.data.init_args.loader.batch_size == 64


def test_step_flops_match_the_closed_form_of_a_linear_and_a_conv_layer() -> None:
    B, n_in, n_out = 8, 32, 24
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in, requires_grad=True)
    # forward 2·B·in·out; backward: grad of the input and of the weight, 2·B·in·out each
    assert harness.count_flops(lambda: lin(x).sum().backward()) == 6 * B * n_in * n_out

    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    img = torch.randn(2, 4, 8, 8)  # no input gradient: forward + weight gradient only
    fwd = 2 * 2 * 6 * 8 * 8 * 4 * 9
    assert harness.count_flops(lambda: conv(img).sum().backward()) == 2 * fwd


def test_training_state_is_twenty_bytes_per_parameter() -> None:
    assert sum(gpu_scale.BYTES_PER_PARAM.values()) == 20
    assert gpu_scale.training_state_bytes(1_000_000) == 20_000_000


def test_memory_estimate_adds_states_copies_and_activations_linear_in_batch() -> None:
    module = gpu_scale.build_stage("experiments/decoder/tiny.yaml", "meta")
    est = gpu_scale.estimate_memory(module, (1, 3))
    params = est[1]["params"]
    assert params == sum(p.numel() for p in module.unet.parameters())
    assert est[1]["states_gib"] == pytest.approx(20 * params / GiB)
    assert est[1]["autocast_copies_gib"] == pytest.approx(2 * params / GiB)
    per_sample = est[1]["activation_bytes_per_sample"]
    assert per_sample > 0
    assert est[3]["activations_gib"] == pytest.approx(3 * per_sample / GiB)
    for b in (1, 3):
        e = est[b]
        assert e["total_gib"] == pytest.approx(e["states_gib"] + e["autocast_copies_gib"] + e["activations_gib"])
    # the cards: 95% of the nominal GiB usable
    assert gpu_scale.fits(22.0) == {"24GB": True, "40GB": True, "80GB": True}
    assert gpu_scale.fits(30.0) == {"24GB": False, "40GB": True, "80GB": True}


def test_estimate_keeps_flash_attention_state_not_the_attention_matrix() -> None:
    q = torch.zeros(1, 4, 1024, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gpu_scale._flash_like(q, q, q)
    qkv_out = 4 * q.numel() * 2
    lse = 4 * 1024 * 4
    assert sum(saved) == qkv_out + lse


def test_quick_mode_runs_on_cpu_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_scale.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_scale", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 120, elapsed  # ~20 s alone on one core
    result = json.loads(out.read_text())
    assert {"bench", "device", "mode", "peak", "timed", "fit", "wall_s"} <= set(result)
    assert result["device"] == "cpu" and result["peak"]["peak_flops"] > 0
    assert [r["name"].split(" ")[0] for r in result["timed"]] == ["decoder/gpu_300m", "prior/paper"]
    for row in result["timed"]:
        assert "error" not in row, row
        assert row["label"] == "cpu-quick" and row["flops_per_step"] > 0 and 0 < row["mfu"] < 1.5
    stages = {r["stage"] for r in result["fit"]}
    assert {"decoder/gpu_300m", "decoder/paper", "prior/paper"} <= stages
    for row in result["fit"]:
        if "error" in row:
            continue
        assert "measured" not in row  # no GPU: estimates only, labelled as such
        assert set(row["estimated_fits"]) == {"24GB", "40GB", "80GB"}
    gpu = [r for r in result["fit"] if r.get("stage") == "decoder/gpu_300m"]
    assert [r["batch_per_gpu"] for r in gpu] == [32, 64, 128] and gpu[0]["params"] > 300e6
    assert "memory fit" in proc.stdout and "cpu-quick" in proc.stdout
