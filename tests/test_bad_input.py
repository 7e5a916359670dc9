"""Bad input, as a careless or hostile user gives it: every case exits non-zero with exactly one
`unclip COMMAND: error:` line naming the culprit, no traceback, and writes nothing.

Parse-and-validate only (no training): the pipeline folder is a tiny one saved once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from modules.cli.main import main
from tests.test_pipeline import _pipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    return _pipeline().save(tmp_path_factory.mktemp("good") / "pipe")


@pytest.fixture
def work(tmp_path: Path, pipe_dir: Path) -> Path:
    """A fresh copy of the good pipeline at `work/pipe`, an image, a file and a read-only folder."""
    shutil.copytree(pipe_dir, tmp_path / "pipe")
    from PIL import Image

    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_an_image.png").write_bytes(b"GIF89a garbage")
    (tmp_path / "outside.safetensors").write_bytes((pipe_dir / "decoder.safetensors").read_bytes())
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o555)
    yield tmp_path
    (tmp_path / "readonly").chmod(0o755)


def refused(argv: list[str], capsys, culprit: str, out: Path | None) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " error: " in line]
    assert rc != 0, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert culprit.lower() in lines[0].lower(), lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} was written"


# -- pipeline folders: pipeline.json and the weight files are untrusted --------------------------
def edit_spec(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(pipe: Path) -> None:
        spec = json.loads((pipe / "pipeline.json").read_text())
        result = fn(spec)
        (pipe / "pipeline.json").write_text(json.dumps(spec if result is None else result))
    return apply


def set_key(path: str, value) -> Callable[[Path], None]:
    def fn(spec: dict) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        node[last] = value
    return edit_spec(fn)


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda pipe: (pipe / name).write_bytes(data)


def symlink_out(pipe: Path) -> None:
    (pipe / "decoder.safetensors").unlink()
    (pipe / "decoder.safetensors").symlink_to(pipe.parent / "outside.safetensors")


def truncate(name: str) -> Callable[[Path], None]:
    def apply(pipe: Path) -> None:
        data = (pipe / name).read_bytes()
        (pipe / name).write_bytes(data[: len(data) // 2])
    return apply


PIPELINE_CASES = {
    "no_pipeline_json": (lambda pipe: (pipe / "pipeline.json").unlink(), "no pipeline.json"),
    "json_not_json": (write("pipeline.json", b"{not json"), "invalid JSON"),
    "json_not_utf8": (write("pipeline.json", b"\xff\xfe\x00garbage"), "not UTF-8"),
    "json_a_list": (write("pipeline.json", b"[1, 2]"), "expected a JSON object"),
    "wrong_format": (set_key("format", "other"), "format"),
    "wrong_version": (set_key("version", 99), "version"),
    "no_decoder": (edit_spec(lambda s: s.pop("decoder") and None), "missing field 'decoder'"),
    "decoder_a_list": (set_key("decoder", [1]), "decoder: expected an object"),
    "class_not_allowed": (set_key("decoder.class_path", "os.system"), "not an allowed decoder"),
    "class_path_not_str": (set_key("decoder.class_path", 7), "decoder.class_path"),
    "hparams_a_list": (set_key("decoder.hparams", [1, 2]), "decoder.hparams"),
    "weights_not_str": (set_key("decoder.weights", {"a": 1}), "decoder.weights"),
    "weights_absolute": (set_key("decoder.weights", "/etc/passwd"), "relative to the pipeline folder"),
    "weights_dotdot": (set_key("decoder.weights", "../outside.safetensors"), "relative to the pipeline folder"),
    "weights_symlink_out": (symlink_out, "outside the pipeline folder"),
    "weights_missing": (lambda pipe: (pipe / "decoder.safetensors").unlink(), "missing"),
    "weights_empty_name": (set_key("decoder.weights", ""), "relative to the pipeline folder"),
    "weights_truncated": (truncate("decoder.safetensors"), "not a readable safetensors"),
    "weights_garbage": (write("decoder.safetensors", b"\x00" * 64), "not a readable safetensors"),
    "weights_huge_header": (write("decoder.safetensors", struct.pack("<Q", 2**60) + b"{}"), "not a readable safetensors"),
    "weights_other_shapes": (set_key("decoder.hparams.unet.model_channels", 32), "does not fit"),
    "image_size_huge": (set_key("decoder.hparams.unet.image_size", 10**6), "image_size"),
    "image_size_zero": (set_key("decoder.hparams.unet.image_size", 0), "image_size"),
    "image_size_not_halving": (set_key("decoder.hparams.unet.image_size", 31), "image_size"),
    "model_channels_str": (set_key("decoder.hparams.unet.model_channels", "wide"), "model_channels"),
    "channel_mult_empty": (set_key("decoder.hparams.unet.channel_mult", []), "channel_mult"),
    "res_blocks_negative": (set_key("decoder.hparams.unet.num_res_blocks", -1), "num_res_blocks"),
    "unknown_hparam": (set_key("decoder.hparams.warp_factor", 9), "warp_factor"),
    "sampling_steps_zero": (set_key("decoder.hparams.sampling.steps", 0), "sampling.steps"),
    "timesteps_huge": (set_key("decoder.hparams.diffusion", {"timesteps": 10**9}), "timesteps"),
    "dropout_above_one": (set_key("decoder.hparams.unet.dropout", 3.0), "dropout"),
    "clip_not_object": (set_key("clip", "tiny-vit"), "clip"),
    "clip_unknown_model": (set_key("clip.model_name", "ViT-Z-99"), "unknown CLIP model"),
    "clip_weights_absolute": (set_key("clip.weights", "/etc/hostname"), "relative to the pipeline folder"),
    "clip_weights_dotdot": (set_key("clip.weights", "../outside.safetensors"), "relative to the pipeline folder"),
    "clip_weights_garbage": (write("clip.safetensors", b"garbage!" * 8), "clip.weights"),
    "clip_weights_wrong_model": (lambda pipe: shutil.copy(pipe / "decoder.safetensors", pipe / "clip.safetensors"), "clip.weights"),
    "upsamplers_not_list": (set_key("upsamplers", {"a": 1}), "upsamplers"),
    "prior_width_huge": (set_key("prior", {"class_path": "modules.stages.prior.PriorModule",
                                            "hparams": {"clip_model": "tiny-vit", "prior": {"width": 10**7, "heads": 1}},
                                            "weights": "decoder.safetensors"}), "prior.width"),
    "prior_depth_zero": (set_key("prior", {"class_path": "modules.stages.prior.PriorModule",
                                           "hparams": {"clip_model": "tiny-vit", "prior": {"depth": 0}},
                                           "weights": "decoder.safetensors"}), "prior.depth"),
    "upsampler_not_allowed": (set_key("upsamplers", [{"class_path": "subprocess.Popen", "hparams": {}, "weights": "decoder.safetensors"}]), "not an allowed"),
    "prior_not_allowed": (set_key("prior", {"class_path": "builtins.eval", "hparams": {}, "weights": "decoder.safetensors"}), "not an allowed"),
    "other_clip_decoder": (set_key("decoder.hparams.clip_model", "tiny-rn"), "tiny-rn"),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_bad_pipeline_folder_is_refused_in_one_line(case: str, work: Path, capsys) -> None:
    mutate, culprit = PIPELINE_CASES[case]
    mutate(work / "pipe")
    out = work / "out"
    refused(["generate", "--pipeline", str(work / "pipe"), "--prompt", "a red circle", "--num-images", "1",
             "--steps", "2", "--out", str(out)], capsys, culprit, out)


# -- command-line values ----------------------------------------------------------------------------
GEN = ["generate", "--pipeline", "{pipe}", "--prompt", "a red circle", "--out", "{out}"]
VARY = ["vary", "--pipeline", "{pipe}", "--image", "{work}/red.png", "--out", "{out}"]
INTERP = ["interpolate", "--pipeline", "{pipe}", "--image", "{work}/red.png", "--image", "{work}/red.png", "--out", "{out}"]
DIFF = ["textdiff", "--pipeline", "{pipe}", "--image", "{work}/red.png", "--base-caption", "a red circle",
        "--caption", "a blue circle", "--out", "{out}"]
EVAL = ["evaluate", "--pipeline", "{pipe}", "--out", "{out}"]
SHAPES_EVAL = ["evaluate-shapes", "--pipeline", "{pipe}", "--out", "{out}"]
DATA = ["data", "shapes", "--out", "{out}"]
EMBED = ["embed", "--clip", "tiny-vit", "--weights", "none", "--shards", "{work}/none-*.tar", "--out", "{out}"]

ARG_CASES = {
    "gen_num_images_zero": (GEN + ["--num-images", "0"], "--num-images"),
    "gen_num_images_negative": (GEN + ["--num-images", "-3"], "--num-images"),
    "gen_num_images_huge": (GEN + ["--num-images", "100000000"], "--num-images"),
    "gen_num_images_word": (GEN + ["--num-images", "four"], "--num-images"),
    "gen_steps_zero": (GEN + ["--steps", "0"], "--steps"),
    "gen_steps_huge": (GEN + ["--steps", "5000"], "--steps"),
    "gen_seed_negative": (GEN + ["--seed", "-1"], "--seed"),
    "gen_guidance_nan": (GEN + ["--decoder-guidance", "nan"], "--decoder-guidance"),
    "gen_guidance_negative": (GEN + ["--decoder-guidance", "-2"], "--decoder-guidance"),
    "gen_prior_guidance_inf": (GEN + ["--prior-guidance", "inf"], "--prior-guidance"),
    "gen_out_is_file": (["generate", "--pipeline", "{pipe}", "--prompt", "x", "--out", "{work}/a_file"], "not a directory"),
    "gen_out_under_file": (["generate", "--pipeline", "{pipe}", "--prompt", "x", "--out", "{work}/a_file/sub"], "not a directory"),
    "gen_out_read_only": (["generate", "--pipeline", "{pipe}", "--prompt", "x", "--out", "{work}/readonly/out"], "not writable"),
    "gen_no_prompt": (["generate", "--pipeline", "{pipe}", "--out", "{out}"], "no prompt"),
    "gen_empty_prompt": (["generate", "--pipeline", "{pipe}", "--prompt", "  ", "--out", "{out}"], "empty"),
    "gen_prompts_file_missing": (["generate", "--pipeline", "{pipe}", "--prompts-file", "{work}/nope.txt", "--out", "{out}"], "nope.txt"),
    "gen_no_pipeline_flag": (["generate", "--prompt", "x", "--out", "{out}"], "--pipeline"),
    "gen_pipeline_missing": (["generate", "--pipeline", "{work}/nope", "--prompt", "x", "--out", "{out}"], "nope"),
    "gen_pipeline_is_file": (["generate", "--pipeline", "{work}/a_file", "--prompt", "x", "--out", "{out}"], "a_file"),
    "gen_unknown_flag": (GEN + ["--colour", "red"], "--colour"),
    "vary_eta_above_one": (VARY + ["--eta", "2"], "--eta"),
    "vary_num_images_zero": (VARY + ["--num-images", "0"], "--num-images"),
    "vary_image_missing": (["vary", "--pipeline", "{pipe}", "--image", "{work}/nope.png", "--out", "{out}"], "nope.png"),
    "vary_image_not_image": (["vary", "--pipeline", "{pipe}", "--image", "{work}/not_an_image.png", "--out", "{out}"], "not_an_image.png"),
    "vary_steps_negative": (VARY + ["--steps", "-5"], "--steps"),
    "interp_one_image": (["interpolate", "--pipeline", "{pipe}", "--image", "{work}/red.png", "--out", "{out}"], "--image"),
    "interp_num_images_zero": (INTERP + ["--num-images", "0"], "--num-images"),
    "textdiff_theta_above_one": (DIFF + ["--max-theta", "1.5"], "--max-theta"),
    "textdiff_empty_caption": (["textdiff", "--pipeline", "{pipe}", "--image", "{work}/red.png", "--base-caption", " ",
                                "--caption", "a blue circle", "--out", "{out}"], "caption"),
    "eval_num_samples_zero": (EVAL + ["--num-samples", "0"], "--num-samples"),
    "eval_batch_size_zero": (EVAL + ["--batch-size", "0"], "--batch-size"),
    "eval_kid_subset_size_one": (EVAL + ["--kid-subset-size", "1"], "--kid-subset-size"),
    "eval_guidance_negative": (EVAL + ["--guidance-scale", "-1"], "--guidance-scale"),
    "eval_both_sources": (EVAL + ["--checkpoint", "{work}/a_file"], "--checkpoint"),
    "eval_out_is_file": (["evaluate", "--pipeline", "{pipe}", "--out", "{work}/a_file"], "not a directory"),
    "eval_shapes_two_prompts": (SHAPES_EVAL + ["--num-prompts", "2"], "--num-prompts"),
    "eval_shapes_steps_zero": (SHAPES_EVAL + ["--steps", "0"], "--steps"),
    "eval_shapes_candidates_zero": (SHAPES_EVAL + ["--decoder-candidates", "0"], "--decoder-candidates"),
    "data_num_samples_zero": (DATA + ["--num-samples", "0"], "--num-samples"),
    "data_num_samples_negative": (DATA + ["--num-samples", "-5"], "--num-samples"),
    "data_size_zero": (DATA + ["--size", "0"], "--size"),
    "data_size_word": (DATA + ["--size", "big"], "--size"),
    "data_val_fraction_above_one": (DATA + ["--val-fraction", "1.5"], "--val-fraction"),
    "data_two_object_negative": (DATA + ["--two-object-fraction", "-0.1"], "--two-object-fraction"),
    "data_shard_size_zero": (DATA + ["--shard-size", "0"], "--shard-size"),
    "data_workers_zero": (DATA + ["--workers", "0"], "--workers"),
    "data_out_is_file": (["data", "shapes", "--out", "{work}/a_file"], "not a directory"),
    "data_unknown_dataset": (["data", "mnist", "--out", "{out}"], "mnist"),
    "embed_batch_size_zero": (EMBED + ["--batch-size", "0"], "--batch-size"),
    "embed_workers_negative": (EMBED + ["--num-workers", "-1"], "--num-workers"),
    "embed_image_size_zero": (EMBED + ["--image-size", "0"], "--image-size"),
    "embed_out_is_file": (["embed", "--clip", "tiny-vit", "--weights", "none", "--shards", "x.tar", "--out", "{work}/a_file"], "not a directory"),
    "embed_no_shards_match": (EMBED, "none-*.tar"),
    "embed_weights_missing": (["embed", "--clip", "tiny-vit", "--weights", "{work}/nope.ckpt", "--shards", "{work}/x.tar",
                               "--out", "{out}"], "nope.ckpt"),
    "unknown_command": (["paint", "--out", "{out}"], "paint"),
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_command_line_value_is_refused_in_one_line(case: str, work: Path, capsys) -> None:
    argv, culprit = ARG_CASES[case]
    if case == "gen_out_read_only" and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    out = work / "out"
    fill = {"pipe": str(work / "pipe"), "work": str(work), "out": str(out)}
    refused([a.format(**fill) for a in argv], capsys, culprit, out)


# -- training configs (LightningCLI): refused while parsing, before any data is read ---------------
ROOT = Path(__file__).resolve().parents[1]
DECODER = ["fit", "--config", str(ROOT / "experiments/decoder/tiny.yaml"), "--trainer.logger=false",
           "--trainer.default_root_dir={out}", "--data.train_shards={shards}", "--data.val_shards={shards}"]

FIT_CASES = {
    "batch_size_negative": (DECODER + ["--data.loader.batch_size=-4"], "batch_size"),
    "batch_size_zero": (DECODER + ["--data.loader.batch_size=0"], "batch_size"),
    "num_workers_negative": (DECODER + ["--data.loader.num_workers=-1"], "num_workers"),
    "unet_image_size_zero": (DECODER + ["--model.unet.image_size=0"], "image_size"),
    "unet_image_size_not_halving": (DECODER + ["--model.unet.image_size=30"], "image_size"),
    "unet_channels_negative": (DECODER + ["--model.unet.model_channels=-8"], "model_channels"),
    "sampling_steps_zero": (DECODER + ["--model.sampling.steps=0"], "steps"),
    "diffusion_timesteps_one": (DECODER + ["--model.diffusion.timesteps=1"], "timesteps"),
    "unknown_key": (DECODER + ["--model.warp_factor=9"], "warp_factor"),
    "config_missing": (["fit", "--config", "{work}/nope.yaml"], "nope.yaml"),
    "config_not_utf8": (["fit", "--config", "{work}/latin1.yaml"], "latin1.yaml"),
    "config_not_yaml_mapping": (["fit", "--config", "{work}/list.yaml"], "list.yaml"),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_bad_training_config_is_refused_in_one_line(case: str, work: Path, tiny_shards, capsys) -> None:
    (work / "latin1.yaml").write_bytes("trainer:\n  default_root_dir: caf\xe9\n".encode("latin-1"))
    (work / "list.yaml").write_text("- 1\n- 2\n")
    argv, culprit = FIT_CASES[case]
    out = work / "out"
    fill = {"work": str(work), "out": str(out), "shards": tiny_shards[0]}
    os.environ.setdefault("WANDB_MODE", "offline")
    refused([a.format(**fill) for a in argv], capsys, culprit, out)


def test_the_suite_has_at_least_100_cases() -> None:
    assert len(PIPELINE_CASES) + len(ARG_CASES) + len(FIT_CASES) >= 100


# -- failed or killed commands leave nothing behind -------------------------------------------------
def test_failed_evaluate_removes_the_output_folder_it_created(work: Path, capsys, monkeypatch) -> None:
    """A failure after the report folder was created (here: while scoring) removes that folder; a
    folder that existed before is left alone."""
    import modules.evaluation.evaluate as ev
    from modules.core.errors import UserError

    def boom(cfg, *args, **kwargs):
        (Path(cfg.out) / "images").mkdir(parents=True)
        (Path(cfg.out) / "images" / "sample_00000.png").write_bytes(b"partial")
        raise UserError("scoring failed")

    monkeypatch.setattr(ev, "evaluate", boom)
    out = work / "report"
    refused(["evaluate", "--pipeline", str(work / "pipe"), "--num-samples", "2", "--out", str(out)], capsys, "scoring failed", None)
    assert not out.exists()
    kept = work / "existing"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep")
    refused(["evaluate", "--pipeline", str(work / "pipe"), "--num-samples", "2", "--out", str(kept)], capsys, "scoring failed", None)
    assert (kept / "mine.txt").read_text() == "keep"


def test_killed_pipeline_write_leaves_a_temp_folder_the_next_write_removes(work: Path) -> None:
    """`kill -9` during `unclip pipeline` leaves `.pipe.<pid>.*`; the next save beside it removes
    it when that process is gone, and never a live writer's."""
    import subprocess
    import sys

    from modules.pipelines.unclip import UnCLIPPipeline

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = work / f".pipe2.{int(dead.stdout)}.abc123"
    orphan.mkdir()
    (orphan / "decoder.safetensors").write_bytes(b"half")
    live = work / f".pipe2.{os.getpid()}.def456"
    live.mkdir()
    UnCLIPPipeline.load(work / "pipe").save(work / "pipe2")
    assert not orphan.exists() and live.exists()
    assert (work / "pipe2" / "pipeline.json").is_file()


def test_unclip_fit_does_not_warn_about_its_own_args(monkeypatch, capsys, recwarn) -> None:
    """`unclip fit ...` passes its argv to LightningCLI while sys.argv holds the same words; Lightning's
    "args parameter ... not recommended" warning was printed on every run."""
    import sys

    argv = ["fit", "--config", str(ROOT / "experiments/decoder/tiny.yaml"), "--model.warp_factor=9"]
    monkeypatch.setattr(sys, "argv", ["unclip", *argv])
    assert main(argv) == 2
    assert "warp_factor" in capsys.readouterr().err
    assert not [w for w in recwarn if "args parameter" in str(w.message)]
