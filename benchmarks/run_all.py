"""`make bench` / `unclip bench`: this project vs dalle2-pytorch, one table of ratios (ours / theirs).

Every measurement runs in a fresh process: ours with this interpreter, theirs with the peer's
virtualenv (`.venv-bench`, made by `make bench`), alternating which side goes first, under the
same thread count and allocator settings (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`: glibc
page faults on large allocations otherwise dominate CPU steps). Our networks are sized to the
peer's parameter counts, which the peer reports first. The machine's matmul peak is measured in
the same run, so the decoder step's achieved FLOP/s is also given as a fraction of it. The load
average before and after is recorded: other processes on the cores distort wall time, process CPU
time (user + system) much less, so both are reported.

    .venv/bin/python -m benchmarks.run_all [--repeats 2] [--threads 1] [--device cuda --dtype bf16 --compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import COMPILE_MODES, parse_result
from modules.core.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench.json"
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
# Targets from the issue: speed = throughput ours / theirs (at least), memory = ours / theirs (at most).
SPEED_TARGETS = {"decoder_train": 2.5, "prior_train": 5.0, "decoder_sample": 2.5, "prior_sample": 2.5}
MEMORY_TARGET = 0.5  # training benchmarks
ROW_FIELDS = ("job", "bench", "dtype", "params_ours", "params_theirs", "params_ratio", "throughput_ours",
              "throughput_theirs", "unit", "speed_ratio", "speed_ratio_cpu", "cpu_s_ours", "cpu_s_theirs",
              "wall_s_ours", "wall_s_theirs", "mem_mb_ours", "mem_mb_theirs", "memory_ratio", "flops_ours",
              "flops_theirs", "peak_fraction_ours", "peak_fraction_theirs", "speed_target", "speed_met",
              "memory_target", "memory_met")


@dataclass
class Job:
    """One row of the table: a benchmark module and its arguments (both sides)."""

    name: str
    module: str
    args: list[str]
    match: str  # "decoder" or "prior": whose peer parameter count our network is sized to
    dtype: str = "fp32"
    theirs_from: str | None = None  # take the peer's runs from this job (its cost does not change)
    runs: list[dict[str, Any]] = field(default_factory=list)


# Both sides' U-Nets in channels-last (NHWC) layout, oneDNN's native one: measured faster for ours
# (efficient layout 0.564 -> 0.520 s per train step) and for the peer (6.90 -> 6.98 images/s).
DECODER_ARGS = ["--channels-last"]


# On CUDA the train steps are milliseconds: more of them are timed, and one row more measures the
# decoder step at a batch that fills the GPU (model FLOPs utilisation; batch 8 at 64 px is launch-bound).
CUDA_TRAIN_ARGS = ["--steps", "20", "--warmup", "5"]
CUDA_SAMPLE_ARGS = ["--steps", "3"]
CUDA_MFU_BATCH = 256


def is_cuda(device: Any) -> bool:
    """Whether a device name (as given on the command line or stored in a result) is a CUDA one."""
    return str(device or "cpu").startswith("cuda")


def default_jobs(dtypes: list[str], tiny: bool, device: str = "cpu") -> list[Job]:
    """The table's rows. Variants of one side (20-token captions, the efficient U-Net layout, ...)
    run at fp32 on CPU and at bf16 on CUDA (the precision each device trains in), as does sampling."""
    cuda = is_cuda(device)
    variant = "bf16" if cuda and "bf16" in dtypes else "fp32"
    train_extra = CUDA_TRAIN_ARGS if cuda else []
    jobs = []
    for dtype in dtypes:
        jobs.append(Job(f"decoder_train/{dtype}", "benchmarks.bench_decoder", ["--dtype", dtype, *DECODER_ARGS], "decoder", dtype))
        jobs.append(Job(f"prior_train/{dtype}", "benchmarks.bench_prior", ["--dtype", dtype], "prior", dtype))
    # Variants of one side; each reuses the peer's runs of the row named last (its cost does not change).
    if variant in dtypes:
        variants = [
            # Captions of 20 real tokens in the 77-token context: we trim the padding, the peer pads
            # every caption to 256 positions whatever its length.
            ("20tok", "benchmarks.bench_prior", ["--caption-tokens", "20"], "prior", "prior_train"),
            # Our U-Net in Imagen's Efficient U-Net layout at the same parameter count.
            ("efficient", "benchmarks.bench_decoder", ["--layout", "efficient", *DECODER_ARGS], "decoder", "decoder_train"),
            # The same, GroupNorm+SiLU recomputed in backward: training memory bought with time.
            ("efficient/recompute", "benchmarks.bench_decoder", ["--layout", "efficient", "--recompute-norms", *DECODER_ARGS],
             "decoder", "decoder_train"),
            # The same layout with self-attention at 8 px only (the peer's is at its 8 px middle only).
            ("efficient-attn8", "benchmarks.bench_decoder", ["--layout", "efficient-attn8", *DECODER_ARGS], "decoder", "decoder_train"),
        ]
        if not cuda:  # our linear layers on MKL's sgemm instead of oneDNN (what the oneDNN routing is worth)
            variants.insert(1, ("mkl", "benchmarks.bench_prior", ["--cpu-linear", "blas"], "prior", "prior_train"))
        jobs += [Job(f"{bench}/{variant}/{name}", module, ["--dtype", variant, *args], match, variant, theirs_from=f"{bench}/{variant}")
                 for name, module, args, match, bench in variants]
        if cuda:  # both sides again at a batch that fills the GPU
            jobs.append(Job(f"decoder_train/{variant}/efficient/b{CUDA_MFU_BATCH}", "benchmarks.bench_decoder",
                            ["--dtype", variant, "--layout", "efficient", "--batch", str(CUDA_MFU_BATCH), *DECODER_ARGS],
                            "decoder", variant))
    for job in jobs:
        job.args += train_extra
    sample_args = ["--dtype", variant, *(CUDA_SAMPLE_ARGS if cuda else [])]
    jobs.append(Job(f"decoder_sample/{variant}", "benchmarks.bench_sampling", ["--model", "decoder", *DECODER_ARGS, *sample_args],
                    "decoder", variant))
    jobs.append(Job(f"decoder_sample/{variant}/efficient", "benchmarks.bench_sampling",
                    ["--model", "decoder", "--layout", "efficient", *DECODER_ARGS, *sample_args],
                    "decoder", variant, theirs_from=f"decoder_sample/{variant}"))
    jobs.append(Job(f"decoder_sample/{variant}/efficient-attn8", "benchmarks.bench_sampling",
                    ["--model", "decoder", "--layout", "efficient-attn8", *DECODER_ARGS, *sample_args],
                    "decoder", variant, theirs_from=f"decoder_sample/{variant}"))
    jobs.append(Job(f"prior_sample/{variant}", "benchmarks.bench_sampling", ["--model", "prior", *sample_args], "prior", variant))
    if tiny:
        for job in jobs:
            for flag in ("--steps", "--warmup", "--batch"):  # tiny: one step of the tiny sizes
                if flag in job.args:
                    i = job.args.index(flag)
                    del job.args[i:i + 2]
            job.args += ["--tiny", "--steps", "1", "--warmup", "1"] + (["--sample-steps", "3"] if "sample" in job.name else [])
            if "--caption-tokens" in job.args:
                job.args[job.args.index("--caption-tokens") + 1] = "5"
    return jobs


# ------------------------------------------------------------------------------------ processes
def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, **ALLOCATOR_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_process(python: str, module: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `python -m module args` in the repository; its result plus whole-process wall/CPU time."""
    cmd = [python, "-m", module, *args]
    start, before = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = parse_result(proc.stdout)
    result["process"] = {"wall_s": time.perf_counter() - start,
                         "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}
    return result


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ------------------------------------------------------------------------------------ report
def best(runs: list[dict[str, Any]], side: str) -> dict[str, Any]:
    """The run of `side` with the highest throughput (least disturbed by other processes)."""
    mine = [r for r in runs if r["side"] == side]
    return max(mine, key=lambda r: r["throughput"])


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def make_row(job: Job, peak: dict[str, Any] | None, theirs_runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ours, theirs = best(job.runs, "ours"), best(theirs_runs if theirs_runs is not None else job.runs, "theirs")
    bench = ours["bench"]
    speed_target = SPEED_TARGETS.get(bench)
    memory_target = MEMORY_TARGET if bench.endswith("_train") else None
    # On CPU achieved FLOP/s per CPU-second (robust to other processes); on CUDA per wall second,
    # where a fraction of the matmul peak is the model FLOPs utilisation.
    clock = "wall" if is_cuda(ours.get("device")) else "cpu"
    peak_flops = (peak or {}).get("peak", {}).get(job.dtype, {}).get(f"flops_{clock}")
    achieved = "achieved_flops" if clock == "wall" else "achieved_flops_cpu"
    row = {
        "job": job.name, "bench": bench, "dtype": job.dtype, "unit": ours["unit"],
        "params_ours": ours["params"], "params_theirs": theirs["params"], "params_ratio": ratio(ours["params"], theirs["params"]),
        "throughput_ours": ours["throughput"], "throughput_theirs": theirs["throughput"],
        "speed_ratio": ratio(ours["throughput"], theirs["throughput"]),
        "speed_ratio_cpu": ratio(ours["throughput_cpu"], theirs["throughput_cpu"]),
        "cpu_s_ours": ours["cpu_s"], "cpu_s_theirs": theirs["cpu_s"], "wall_s_ours": ours["wall_s"], "wall_s_theirs": theirs["wall_s"],
        "mem_mb_ours": ours["mem_mb"], "mem_mb_theirs": theirs["mem_mb"], "memory_ratio": ratio(ours["mem_mb"], theirs["mem_mb"]),
        "flops_ours": ours.get("flops_per_step"), "flops_theirs": theirs.get("flops_per_step"),
        "peak_fraction_ours": ratio(ours.get(achieved), peak_flops),
        "peak_fraction_theirs": ratio(theirs.get(achieved), peak_flops),
        "speed_target": speed_target, "memory_target": memory_target,
    }
    row["speed_met"] = None if speed_target is None else row["speed_ratio"] >= speed_target
    row["memory_met"] = None if memory_target is None else row["memory_ratio"] <= memory_target
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len("benchmark")] + [len(r["job"]) for r in rows])
    head = (f"{'benchmark':<{width}} {'params o/t':>10} {'ours':>9} {'theirs':>9} {'unit':<13} {'speed':>6} {'(cpu)':>6} "
            f"{'target':>6} {'mem o/t':>7} {'MB ours':>8} {'MB theirs':>9} {'peak% o/t':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "-" if r["speed_target"] is None else f"{r['speed_target']:.1f}{'+' if r['speed_met'] else '!'}"
        mem = _fmt(r["memory_ratio"], ".2f") + ("" if r["memory_met"] is None else ("+" if r["memory_met"] else "!"))
        peak = ("-" if r["peak_fraction_ours"] is None else
                f"{100 * r['peak_fraction_ours']:.0f}/{100 * r['peak_fraction_theirs']:.0f}")
        lines.append(
            f"{r['job']:<{width}} {_fmt(r['params_ratio'], '.3f'):>10} {r['throughput_ours']:>9.3g} {r['throughput_theirs']:>9.3g} "
            f"{r['unit']:<13} {r['speed_ratio']:>5.2f}x {_fmt(r['speed_ratio_cpu'], '.2f'):>5}x {target:>6} {mem:>7} "
            f"{r['mem_mb_ours']:>8.0f} {r['mem_mb_theirs']:>9.0f} {peak:>10}")
    lines.append("speed = throughput ours/theirs (wall; cpu = by process CPU time); target met '+', missed '!'; "
                 "mem = peak memory ours/theirs; peak% = achieved FLOP/s (CPU time; CUDA: wall time) / measured matmul peak")
    return "\n".join(lines)


def format_data(data: dict[str, Any]) -> str:
    rows = [("tiny (32 px shapes PNG)", data["tiny"]), ("paper (256->64 px JPEG), this core", data["paper"]["this_core"]),
            ("paper, reference accelerator", data["paper"]["accelerator"])]
    lines = ["data loader: images/s per worker (CPU time) / images/s the decoder consumes"]
    for name, r in rows:
        lines.append(f"  {name:<36} {r['loader_images_per_s_per_worker']:8.0f} / {r['consumed_images_per_s']:9.3g} = "
                     f"{r['ratio']:9.3g}  (workers needed: {r['workers_needed']}; {r['consumer']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    env = child_env(args.threads)
    common = ["--threads", str(args.threads), "--device", args.device] + (["--compile", args.compile] if args.compile else [])
    jobs = default_jobs(args.dtype, args.tiny, args.device)
    if args.only:
        jobs = [j for j in jobs if any(j.name.startswith(prefix) for prefix in args.only)]
    sides = {"ours": args.ours_python, "theirs": args.peer_python}
    report: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_before": load_average(), "host": platform.node(), "cpus": os.cpu_count(),
                              "threads": args.threads, "device": args.device, "allocator_env": ALLOCATOR_ENV, "repeats": args.repeats}
    peak_args = ["--threads", str(args.threads), "--device", args.device] + (["--tiny"] if args.tiny else [])
    report["matmul_peak"] = run_process(args.ours_python, "benchmarks.matmul_peak", peak_args, env, args.timeout)
    counts = {m: run_process(args.peer_python, mod, ["--side", "theirs", "--count-only", *common] + (["--tiny"] if args.tiny else []),
                             env, args.timeout)["params"]
              for m, mod in (("decoder", "benchmarks.bench_decoder"), ("prior", "benchmarks.bench_prior"))}
    report.update(peer_params=counts, errors=[], rows=[], runs={})
    for rep in range(args.repeats):
        for i, job in enumerate(jobs):
            order = ["ours", "theirs"] if (rep + i) % 2 == 0 else ["theirs", "ours"]
            for side in order if job.theirs_from is None else ["ours"]:
                extra = ["--match-params", str(counts[job.match])] if side == "ours" else []
                log(f"[{rep + 1}/{args.repeats}] {job.name} {side} ...")
                try:
                    result = run_process(sides[side], job.module, ["--side", side, *common, *job.args, *extra], env, args.timeout)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as err:  # one broken row loses no other
                    report["errors"].append({"job": job.name, "side": side, "repeat": rep, "error": str(err)[-3000:]})
                    log(f"    FAILED: {str(err)[-1500:]}")
                    continue
                result["repeat"] = rep
                job.runs.append(result)
                log(f"    {result['throughput']:.4g} {result['unit']}, {result['cpu_s']:.3f} s CPU/step, {result['mem_mb']:.0f} MB")
                report["rows"], report["runs"] = table_rows(jobs, report["matmul_peak"]), {j.name: j.runs for j in jobs}
                save_report(report, args.out)  # a run cut short keeps what it measured
    if not args.no_data:
        flops = data_consumer_args(jobs, report["matmul_peak"], args.device)
        log("data loader vs decoder consumption ...")
        report["data"] = run_process(args.ours_python, "benchmarks.bench_data",
                                     ["--threads", str(args.threads), *flops] + (["--tiny"] if args.tiny else []), env, args.timeout)
    report["load_after"] = load_average()
    return report


def table_rows(jobs: list[Job], peak: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per job measured on both sides (a variant's peer side: the runs of the job it names)."""
    by_name = {job.name: job for job in jobs}
    rows = []
    for job in jobs:
        if job.theirs_from is None:
            peer_runs, theirs = job.runs, None
        else:
            peer_runs = theirs = by_name[job.theirs_from].runs if job.theirs_from in by_name else []
        if any(r["side"] == "ours" for r in job.runs) and any(r["side"] == "theirs" for r in peer_runs):
            rows.append(make_row(job, peak, theirs))
    return rows


def save_report(report: dict[str, Any], path: Path) -> None:
    """Write the JSON report atomically (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=1))


def print_report(report: dict[str, Any], threads: int, path: Path) -> None:
    print(format_table(report["rows"]))
    if "data" in report:
        print(format_data(report["data"]))
    for err in report.get("errors", []):
        print(f"FAILED {err['job']} ({err['side']}, round {err['repeat'] + 1}): {err['error'].strip().splitlines()[-1]}")
    peak = report["matmul_peak"]["peak"]
    peak_text = (f"bf16 matmul peak {peak['bf16']['flops_wall'] / 1e12:.0f} TFLOP/s, fp32 {peak['fp32']['flops_wall'] / 1e12:.0f}"
                 if is_cuda(report.get("device")) else
                 f"fp32 matmul peak {peak['fp32']['flops_cpu'] / 1e9:.0f} GFLOP/s per CPU-second")
    print(f"load average before {report['load_before']}, after {report.get('load_after')}; {peak_text}; "
          f"{threads} thread(s); device {report.get('device', 'cpu')}; JSON: {path}")


def data_consumer_args(jobs: list[Job], peak: dict[str, Any], device: str) -> list[str]:
    """bench_data's consumer rates from this run: on CPU the 64 px decoder's FLOP/s per CPU-second;
    on CUDA this GPU's measured bf16 peak and the MFU our decoder step reached at the large batch,
    in place of the assumed reference accelerator."""
    measured = {j.name: j for j in jobs if any(r["side"] == "ours" for r in j.runs)}
    if not is_cuda(device):
        decoder = measured.get("decoder_train/fp32")
        return [] if decoder is None else ["--decoder-flops", str(best(decoder.runs, "ours")["achieved_flops_cpu"])]
    large = measured.get(f"decoder_train/bf16/efficient/b{CUDA_MFU_BATCH}")
    if large is None:
        return []
    peak_bf16 = peak["peak"]["bf16"]["flops_wall"]
    mfu = best(large.runs, "ours")["achieved_flops"] / peak_bf16
    return ["--accelerator-tflops", str(peak_bf16 / 1e12), "--mfu", str(mfu), "--accelerator-label", f"this GPU ({device}), measured"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="unclip bench", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all benchmarks (best round is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="precisions of the train-step rows (sampling rows: fp32)")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=COMPILE_MODES, help="torch.compile both sides' networks (mode; reduce-overhead: CUDA graphs)")
    parser.add_argument("--only", nargs="*", default=None, help="job name prefixes, e.g. decoder_train prior_sample")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, one step (a smoke test)")
    parser.add_argument("--no-data", action="store_true", help="skip the data-loader measurement")
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON), help="python of the dalle2-pytorch venv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--report", type=Path, default=None, help="print the table of a saved JSON report and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text())
        print_report(report, report.get("threads", 1), args.report)
        return 0
    if not Path(args.peer_python).exists():
        log(f"peer interpreter {args.peer_python} not found: `make bench` creates .venv-bench (dalle2-pytorch)")
        return 2
    report = run(args)
    save_report(report, args.out)
    print_report(report, args.threads, args.out)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
