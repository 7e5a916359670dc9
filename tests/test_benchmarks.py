"""The benchmark harness (no timing assertions): parameter matching, FLOP and memory accounting,
and that every result and the report carry all their fields. The peer (dalle2-pytorch) lives in
its own venv and is never imported here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_decoder, bench_prior, bench_sampling, harness, run_all

RESULT_FIELDS = ("bench", "params", "config", "side", "dtype", "threads", "wall_s", "cpu_s", "user_s", "sys_s",
                 "minor_faults", "mem_mb", "mem_peak_mb", "throughput", "throughput_cpu", "unit", "batch")
TRAIN_FIELDS = ("flops_per_step", "achieved_flops", "achieved_flops_cpu")
PEER_DECODER_PARAMS, PEER_PRIOR_PARAMS = 14_245_251, 24_918_544  # dalle2-pytorch 1.15.6, the benchmark configs


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(main, argv: list[str], capsys) -> dict:
    main(argv)
    return harness.parse_result(capsys.readouterr().out)


def test_decoder_width_is_matched_to_a_parameter_count():
    target = bench_decoder.count_unet_params(bench_decoder.our_unet_config(24, tiny=True))
    assert bench_decoder.match_model_channels(target, tiny=True) == (24, target)
    channels, n = bench_decoder.match_model_channels(PEER_DECODER_PARAMS)
    assert abs(n / PEER_DECODER_PARAMS - 1) <= 0.05 and channels % 8 == 0
    smaller = bench_decoder.count_unet_params(bench_decoder.our_unet_config(channels - 8, tiny=False))
    assert abs(smaller - PEER_DECODER_PARAMS) > abs(n - PEER_DECODER_PARAMS)  # the next width down is further


def test_efficient_layout_matches_the_count_with_fewer_flops_per_step():
    """Imagen's Efficient U-Net layout at the peer's count (±5%) costs less than half the FLOPs of
    the paper layout per train step (forward + backward, batch 8, 64 px; counted on the meta device),
    and downsampling before any 64 px res block (`efficient-top0`) or dropping the 16 px attention
    (`efficient-attn8`) saves more than 5% of that."""
    flops = {}
    for layout in bench_decoder.LAYOUTS:
        channels, n = bench_decoder.match_model_channels(PEER_DECODER_PARAMS, layout=layout)
        assert abs(n / PEER_DECODER_PARAMS - 1) <= 0.05, (layout, n)
        with torch.device("meta"):
            from modules.networks.unet import UNet

            unet = UNet(bench_decoder.our_unet_config(channels, tiny=False, layout=layout))
            x, t, z = torch.randn(8, 3, 64, 64), torch.zeros(8, dtype=torch.long), torch.randn(8, bench_decoder.EMBED_DIM)
            flops[layout] = harness.count_flops(lambda: unet(x, t, image_embed=z).square().mean().backward())
    assert flops["efficient"] < 0.5 * flops["paper"], flops
    assert flops["efficient-top0"] < 0.95 * flops["efficient"], flops
    assert flops["efficient-attn8"] < 0.95 * flops["efficient"], flops


def test_prior_mlp_is_matched_to_a_parameter_count():
    target = bench_prior.count_prior_params(bench_prior.our_prior_config(192, tiny=True))
    assert bench_prior.match_mlp_hidden(target, tiny=True) == (192, target)
    hidden, n = bench_prior.match_mlp_hidden(PEER_PRIOR_PARAMS)
    assert abs(n / PEER_PRIOR_PARAMS - 1) <= 0.01 and hidden % 64 == 0
    config = bench_prior.our_prior_config(hidden, tiny=False)
    assert (config.width, config.depth, config.heads) == (512, 6, 8)  # the peer's README prior


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN fused linear")
def test_flop_counter_counts_the_bf16_linear():
    """Under bf16 autocast our Linear's forward is oneDNN's fused linear: 2·M·N·K, backward 4·M·N·K."""
    from modules.networks.linear import Linear

    layer, x = Linear(48, 80), torch.randn(3, 70, 48, requires_grad=True)
    with harness.flop_counter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert counter.get_total_flops() == 6 * 210 * 48 * 80


def test_flop_counter_counts_cpu_flash_attention():
    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    with harness.flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 7 * 8)  # QK^T and AV, 2 FLOPs per MAC


def test_memory_meter_sees_a_new_allocation():
    meter = harness.MemoryMeter(torch.device("cpu"))
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    report = meter.report()
    assert report["mem_mb"] >= 60 and report["mem_peak_mb"] >= report["mem_base_mb"] + 60
    del block


def test_ours_results_and_report_have_every_field(capsys, one_thread):
    tiny = ["--side", "ours", "--tiny", "--steps", "1", "--warmup", "1"]
    decoder = run_main(bench_decoder.main, tiny, capsys)
    prior = run_main(bench_prior.main, tiny, capsys)
    sample = run_main(bench_sampling.main, [*tiny, "--model", "prior", "--sample-steps", "2"], capsys)
    for result in (decoder, prior, sample):
        assert set(RESULT_FIELDS) <= set(result), set(RESULT_FIELDS) - set(result)
    for result in (decoder, prior):
        assert set(TRAIN_FIELDS) <= set(result) and result["flops_per_step"] > 0
    assert decoder["config"]["image_embed_dim"] == 512 and decoder["unit"] == "images/s"
    assert sample["sample_steps"] == 2 and sample["bench"] == "prior_sample"
    # The report from these results (the peer's side stood in by a copy with other numbers).
    jobs = []
    for name, result in (("decoder_train/fp32", decoder), ("prior_train/fp32", prior), ("prior_sample/fp32", sample)):
        theirs = dict(result, side="theirs", throughput=result["throughput"] / 2, mem_mb=2 * result["mem_mb"])
        jobs.append(run_all.Job(name, "", [], "decoder", runs=[result, theirs]))
    peak = {"peak": {"fp32": {"flops_cpu": 1e11, "flops_wall": 1e11}}}
    rows = [run_all.make_row(job, peak) for job in jobs]
    for row in rows:
        assert set(run_all.ROW_FIELDS) <= set(row), set(run_all.ROW_FIELDS) - set(row)
        assert row["speed_ratio"] == pytest.approx(2.0) and row["params_ratio"] == 1.0
    assert rows[0]["memory_ratio"] == pytest.approx(0.5) and rows[0]["memory_met"] is True
    assert rows[0]["speed_met"] is False and rows[1]["speed_met"] is False and rows[2]["speed_met"] is False
    assert rows[0]["peak_fraction_ours"] == pytest.approx(decoder["achieved_flops_cpu"] / 1e11)
    assert rows[2]["memory_target"] is None and rows[2]["peak_fraction_ours"] is None
    json.dumps(rows)
    assert "decoder_train/fp32" in run_all.format_table(rows)


def test_default_jobs_alternate_and_cover_the_issue():
    jobs = run_all.default_jobs(["fp32", "bf16"], tiny=False)
    assert {j.name.split("/")[0] for j in jobs} == set(run_all.SPEED_TARGETS)
    assert all("--dtype" in j.args for j in jobs if "train" in j.name)
    by_name = {j.name: j for j in jobs}
    for name in ("decoder_train/fp32/efficient-attn8", "decoder_sample/fp32/efficient-attn8"):
        assert by_name[name].args[by_name[name].args.index("--layout") + 1] == "efficient-attn8"
        assert by_name[name].theirs_from == name.rsplit("/", 1)[0]  # the peer's runs of the row above
    env = run_all.child_env(3)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["OMP_NUM_THREADS"] == "3"


def test_cuda_jobs_run_variants_in_bf16_and_one_row_at_a_gpu_batch():
    """On CUDA the variants and sampling run in bf16, the CPU-only MKL row is gone, more steps are
    timed, and the large-batch decoder row measures both sides; --tiny strips the sizes again."""
    jobs = {j.name: j for j in run_all.default_jobs(["bf16"], tiny=False, device="cuda")}
    assert {"prior_train/bf16/20tok", "decoder_train/bf16/efficient", "decoder_sample/bf16", "prior_sample/bf16"} <= set(jobs)
    assert not any("mkl" in name or "fp32" in name for name in jobs)
    large = jobs[f"decoder_train/bf16/efficient/b{run_all.CUDA_MFU_BATCH}"]
    assert large.theirs_from is None and large.args[large.args.index("--batch") + 1] == str(run_all.CUDA_MFU_BATCH)
    assert jobs["decoder_train/bf16/efficient"].theirs_from == "decoder_train/bf16"
    assert all("--steps" in j.args for j in jobs.values())
    for job in run_all.default_jobs(["bf16"], tiny=True, device="cuda"):
        assert "--batch" not in job.args and job.args.count("--steps") == 1 and "--tiny" in job.args
    cpu = {j.name for j in run_all.default_jobs(["fp32", "bf16"], tiny=False)}
    assert "prior_train/fp32/mkl" in cpu and not any(name.startswith("decoder_train/bf16/") for name in cpu)


def fake_run(side: str, throughput: float, device: str = "cpu") -> dict:
    return {"side": side, "bench": "decoder_train", "device": device, "params": 100, "throughput": throughput,
            "throughput_cpu": throughput, "unit": "images/s", "cpu_s": 1.0, "wall_s": 2.0, "mem_mb": 10.0,
            "flops_per_step": 1e9, "achieved_flops": 4e12, "achieved_flops_cpu": 2e12}


def test_rows_need_both_sides_and_cuda_peak_is_by_wall_time(tmp_path, capsys):
    """A job whose peer side failed has no row; on CUDA the peak fraction uses wall time (MFU); a
    saved report prints the same table again (`--report`)."""
    peak = {"peak": {"bf16": {"flops_wall": 8e12, "flops_cpu": 1e15}}}
    complete = run_all.Job("decoder_train/bf16", "", [], "decoder", "bf16",
                           runs=[fake_run("ours", 4.0, "cuda:0"), fake_run("theirs", 2.0, "cuda:0")])
    variant = run_all.Job("decoder_train/bf16/efficient", "", [], "decoder", "bf16", theirs_from="decoder_train/bf16",
                          runs=[fake_run("ours", 6.0, "cuda:0")])
    broken = run_all.Job("prior_train/bf16", "", [], "prior", "bf16", runs=[fake_run("ours", 1.0, "cuda:0")])
    rows = run_all.table_rows([complete, variant, broken], peak)
    assert [r["job"] for r in rows] == ["decoder_train/bf16", "decoder_train/bf16/efficient"]
    assert rows[1]["speed_ratio"] == pytest.approx(3.0)
    assert rows[0]["peak_fraction_ours"] == pytest.approx(0.5)  # 4e12 / 8e12, not the CPU-time figure
    cpu_row = run_all.make_row(run_all.Job("d", "", [], "decoder", "bf16", runs=[fake_run("ours", 4.0), fake_run("theirs", 2.0)]), peak)
    assert cpu_row["peak_fraction_ours"] == pytest.approx(2e12 / 1e15)
    report = {"rows": rows, "load_before": None, "device": "cuda", "threads": 1, "errors": [
        {"job": "prior_train/bf16", "side": "theirs", "repeat": 0, "error": "Traceback ...\nRuntimeError: out of memory"}],
        "matmul_peak": {"peak": {"bf16": {"flops_wall": 8e12}, "fp32": {"flops_wall": 1e12}}}}
    path = tmp_path / "bench.json"
    run_all.save_report(report, path)
    assert not path.with_name("bench.json.tmp").exists()
    assert run_all.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decoder_train/bf16/efficient" in out and "FAILED prior_train/bf16 (theirs, round 1): RuntimeError: out of memory" in out


def test_decoder_batch_option(capsys, one_thread):
    """--batch sizes the step itself (its FLOPs grow with it), not only the throughput arithmetic."""
    tiny = ["--side", "ours", "--tiny", "--steps", "1", "--warmup", "1"]
    default, larger = run_main(bench_decoder.main, tiny, capsys), run_main(bench_decoder.main, [*tiny, "--batch", "3"], capsys)
    assert default["batch"] == 2 and larger["batch"] == 3 and larger["throughput"] == pytest.approx(3 / larger["wall_s"])
    assert larger["flops_per_step"] == pytest.approx(1.5 * default["flops_per_step"], rel=1e-3)


def test_dispatch_timer_counts_each_operator_per_step():
    """profile_step --timer dispatch: every aten call is timed and counted, per step."""
    from benchmarks import profile_step

    a, w = torch.randn(64, 64), torch.randn(8, 3, 3, 3)
    x = torch.randn(1, 3, 16, 16)

    def step() -> None:
        a @ a
        a @ a
        F.conv2d(x, w)

    times = profile_step.dispatch_times(step, steps=3)
    assert times["aten::mm"][1] == 2 and times["aten::convolution"][1] == 1
    assert all(t >= 0 for t, _ in times.values()) and times["aten::mm"][0] > 0
    assert profile_step.group_of("aten::mm") == "gemm (BLAS)"
    assert profile_step.group_of("aten::convolution") == profile_step.group_of("aten::convolution_backward") == "convolution (oneDNN)"


def test_compare_layouts_data_and_held_out_loss():
    """The layout comparison's images are deterministic shapes scenes in [-1, 1], and its held-out
    loss is the ε-MSE at every fixed timestep: exactly mean(ε²) for a network that predicts 0."""
    from benchmarks import compare_layouts
    from modules.diffusion.config import DiffusionConfig

    images = compare_layouts.shapes_images(3, 32, seed=5)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    torch.testing.assert_close(images, compare_layouts.shapes_images(3, 32, seed=5))
    losses = compare_layouts.held_out_loss(lambda x, t: torch.zeros_like(x), DiffusionConfig().build(), images, seed=7)
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    assert list(losses) == list(compare_layouts.EVAL_TIMESTEPS)
    for value in losses.values():
        assert value == pytest.approx(float(eps.square().mean()), rel=1e-5)


def test_caption_reliance_variants_and_relation_of_colours():
    """The diagnostic's caption variants keep the scene's objects and change one thing each, and its
    layout reading returns the relation a drawn scene was placed in (and None without both colours)."""
    import numpy as np

    from benchmarks import caption_reliance
    from datamodules.shapes.grammar import RELATIONS, Obj, parse_caption
    from datamodules.shapes.scene import draw_scene

    a, b = Obj("red", "circle"), Obj("blue", "square")
    found = {name: parse_caption(cap) for name, cap in caption_reliance.variants(a, b).items()}
    assert {name: (objs, rel) for name, (objs, rel, _) in found.items()} == {
        **{f"relation: {rel}": ([a, b], rel) for rel in RELATIONS},
        "colours swapped": ([Obj("blue", "circle"), Obj("red", "square")], RELATIONS[0])}
    boxes = {RELATIONS[0]: ([2, 10, 12, 20], [20, 10, 30, 20]), RELATIONS[1]: ([20, 10, 30, 20], [2, 10, 12, 20]),
             RELATIONS[2]: ([10, 2, 20, 12], [10, 20, 20, 30]), RELATIONS[3]: ([10, 20, 20, 30], [10, 2, 20, 12])}
    for rel, (box_a, box_b) in boxes.items():
        scene = draw_scene({"objects": [{"color": "red", "shape": "circle", "bbox": box_a},
                                        {"color": "blue", "shape": "square", "bbox": box_b}]}, 32)
        image = torch.from_numpy(np.asarray(scene, dtype=np.float32) / 255.0).permute(2, 0, 1)
        assert caption_reliance.relation_of_colours(image, "red", "blue") == rel
        assert caption_reliance.relation_of_colours(image, "red", "green") is None


def test_manipulations_benchmark_targets_and_judge_on_drawn_frames():
    """Every input object is used once; an interpolation's end changes colour and shape, a text
    diff's the colour alone; and the judge passes a row of true drawings of start and end and fails
    it when the two are swapped."""
    from benchmarks import manipulations
    from datamodules.shapes.grammar import ALL_OBJECTS, caption

    objs = ALL_OBJECTS
    assert len(objs) == 18 and len(set(objs)) == 18
    ends = [manipulations.targets(o) for o in objs]
    for obj, (interp_end, diff_end) in zip(objs, ends):
        assert interp_end.color != obj.color and interp_end.shape != obj.shape
        assert diff_end.color == interp_end.color and diff_end.shape == obj.shape
    assert len({e for e, _ in ends}) == 18  # each object is some row's interpolation end
    start, end = objs[0], ends[0][0]
    frames = torch.cat([manipulations.scene(start, 0), manipulations.scene(end, 0)])
    assert frames.shape == (2, 3, 64, 64)
    assert manipulations.judge(frames, caption([start]), caption([end])) == {"start": True, "end": True, "both": True}
    assert manipulations.judge(frames.flip(0), caption([start]), caption([end])) == {"start": False, "end": False,
                                                                                     "both": False}


def test_print_table_aligns_rows_and_ends_with_the_json(capsys):
    import json

    from benchmarks.table import print_table

    table = {"a": {"n": 3, "x": 0.5}, "longer name": {"n": 12, "x": 0.125}}
    print_table("row", table, [("n", "count", "d"), ("x", "rate", ".3f")], name_width=12)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "a" + " " * 11 + "      3  0.500" and lines[2] == "longer name " + "     12  0.125"
    assert len({len(line) for line in lines[:3]}) == 1 and json.loads(lines[3]) == table


def test_layout_plans_judge_reads_relations_by_both_rules():
    """`benchmarks.layout_plans.judge`: a plan drawn by the shard writer passes both rules and the whole
    layout rule; the same boxes under the inverse relation fail all three; a diagonal offset that only the
    evaluator's dominant-axis rule reads as "to the left of" passes that rule alone."""
    import numpy as np

    from benchmarks.layout_plans import judge
    from datamodules.shapes.grammar import INVERSE, Obj, caption
    from datamodules.shapes.scene import layout_scene

    a, b = Obj("red", "circle"), Obj("blue", "square")
    prompts, boxes = [], []
    for i, relation in enumerate(("to the left of", "above", "below", "to the right of")):
        truth = layout_scene(np.random.default_rng(i), 32, [a, b], relation)
        plan = torch.tensor([o["bbox"] for o in truth["objects"]], dtype=torch.float32) / 32
        prompts += [caption([a, b], relation), caption([a, b], INVERSE[relation])]
        boxes += [plan, plan]
    out = judge(prompts, torch.stack(boxes), 32)
    assert out["relation_right"] == 0.5 and out["relation_right_evaluator_rule"] == 0.5
    assert out["follows_layout_rule"] == 0.5
    diagonal = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.5, 0.4, 0.8, 0.7]]])
    out = judge([caption([a, b], "to the left of")], diagonal, 32)
    assert out["relation_right"] == 0.0 and out["relation_right_evaluator_rule"] == 1.0
    assert out["follows_layout_rule"] == 0.0
