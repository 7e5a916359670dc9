"""Embedding export (`unclip embed`): values, keys, fp16, atomic/resumable shards; the prior's
EmbeddingDataModule; the decoder's image + embedding join by key (alignment, skips, errors)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.embeddings import EmbeddingDataModule, EmbeddingJoinError, ImageEmbeddingDataModule, Member, load_npy, pad_tokens
from datamodules.image_text import LoaderConfig
from datamodules.image_text import ImageTextDataModule
from datamodules.shapes.dataset import ShapesConfig, write_shapes_dataset
from modules.cli.main import main
from modules.core.errors import UserError
from modules.cli.embed import export_embeddings
from modules.networks.clip import FrozenCLIP

CLIP = "tiny-vit"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, FrozenCLIP]:
    """Shapes shards (2 x 10 train, 1 x 8 val, 32 px) and their fp32 embeddings from a seeded CLIP."""
    root = tmp_path_factory.mktemp("emb")
    write_shapes_dataset(ShapesConfig(num_samples=28, size=32, shard_size=10, val_fraction=0.3), root / "shapes", workers=1)
    torch.manual_seed(0)
    clip = FrozenCLIP(CLIP)
    weights = root / "clip.bin"
    torch.save(clip.model.state_dict(), weights)
    stats = export_embeddings(CLIP, str(weights), str(root / "shapes/*.tar"), root / "emb", batch_size=4, num_workers=2, progress=False)
    assert stats["shards_written"] == 3 and stats["samples"] == 28 and not stats["skipped"]
    return root / "shapes", root / "emb", clip


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_export_values_keys_and_layout(exported):
    shapes, emb, clip = exported
    assert sorted(p.name for p in emb.glob("*.tar")) == sorted(p.name for p in shapes.glob("*.tar"))
    assert not list(emb.glob("*.tmp"))
    dm = ImageTextDataModule(str(shapes / "val-*.tar"), str(shapes / "val-*.tar"), image_size=32, val_samples=100, tokenizer=CLIP, loader=LoaderConfig(batch_size=8, num_workers=0))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    stored = _members(emb / "val-000000.tar")
    assert list(stored) == batch["key"]  # same keys, same order
    text = clip.encode_text(batch["tokens"])
    z_i = clip.encode_image(batch["image"])
    for i, key in enumerate(batch["key"]):
        m = stored[key]
        assert m[Member.CAPTION.value].decode() == batch["caption"][i]
        np.testing.assert_allclose(_npy(m[Member.IMAGE_EMBED.value]), z_i[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(_npy(m[Member.TEXT_EMBED.value]), text.embed[i].numpy(), atol=1e-5)
        tokens = _npy(m[Member.TEXT_TOKENS.value])
        n_real = int((batch["tokens"][i] != 0).sum())  # SOT .. EOT, zero-padded after
        assert tokens.shape == (n_real, clip.text_width) and tokens.dtype == np.float32
        np.testing.assert_allclose(tokens, text.tokens[i, :n_real].numpy(), atol=1e-5)


def test_resume_skips_complete_shards_and_rejects_other_exports(exported, tmp_path: Path):
    shapes, emb, _ = exported
    weights = str(emb.parent / "clip.bin")
    stats = export_embeddings(CLIP, weights, str(shapes / "*.tar"), emb, num_workers=0, progress=False)
    assert stats["shards_skipped"] == 3 and stats["shards_written"] == 0
    target = tmp_path / "out"
    export_embeddings(CLIP, weights, str(shapes / "train-*.tar"), target, num_workers=0, progress=False)
    kept = (target / "train-000001.tar").stat().st_mtime_ns
    (target / "train-000000.tar").unlink()
    stats = export_embeddings(CLIP, weights, str(shapes / "train-*.tar"), target, num_workers=0, progress=False)
    assert stats["shards_written"] == 1 and stats["samples"] == 10 and stats["shards_skipped"] == 1
    assert (target / "train-000001.tar").stat().st_mtime_ns == kept
    assert _members(target / "train-000000.tar").keys() == _members(emb / "train-000000.tar").keys()
    with pytest.raises(UserError, match="another export"):
        export_embeddings(CLIP, weights, str(shapes / "train-*.tar"), target, fp16=True, num_workers=0, progress=False)


def test_cli_fp16_export(exported, tmp_path: Path, capsys):
    shapes, emb, _ = exported
    out = tmp_path / "half"
    code = main(["embed", "--clip", CLIP, "--weights", str(emb.parent / "clip.bin"), "--shards", str(shapes / "val-*.tar"),
                 "--out", str(out), "--fp16", "--num-workers", "0", "--no-progress"])
    assert code == 0 and "8 samples in 1 shards" in capsys.readouterr().out
    half, full = _members(out / "val-000000.tar"), _members(emb / "val-000000.tar")
    for key in full:
        a, b = _npy(half[key][Member.IMAGE_EMBED.value]), _npy(full[key][Member.IMAGE_EMBED.value])
        assert a.dtype == np.float16 and np.allclose(a, b, atol=1e-3)


def test_pad_tokens_mask_and_values():
    tokens = [torch.ones(2, 3), 2 * torch.ones(4, 3)]
    padded, mask = pad_tokens(tokens)
    assert padded.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert padded[0, 2:].abs().sum() == 0 and (padded[1] == 2).all()
    assert pad_tokens(tokens, pad_to=6)[0].shape == (2, 6, 3)


def test_embedding_datamodule_batches(exported):
    _, emb, _ = exported
    stored = {k: v for p in emb.glob("*.tar") for k, v in _members(p).items()}
    dm = EmbeddingDataModule(str(emb / "train-*.tar"), str(emb / "val-*.tar"), shuffle_buffer=5, val_samples=100, loader=LoaderConfig(batch_size=4, num_workers=2))
    dm.setup("fit")
    keys = []
    for batch in dm.train_dataloader():
        assert batch["image_embed"].shape == (4, 64) and batch["text_embed"].dtype == torch.float32
        assert batch["text_tokens"].shape[:2] == batch["text_mask"].shape and batch["text_tokens"].shape[-1] == 64
        for i, key in enumerate(batch["key"]):
            n = int(batch["text_mask"][i].sum())
            np.testing.assert_array_equal(batch["text_tokens"][i, :n].numpy(), _npy(stored[key][Member.TEXT_TOKENS.value]))
            assert batch["text_tokens"][i, n:].abs().sum() == 0 and batch["text_mask"][i, :n].all()
            np.testing.assert_array_equal(batch["image_embed"][i].numpy(), _npy(stored[key][Member.IMAGE_EMBED.value]))
            assert batch["caption"][i] == stored[key][Member.CAPTION.value].decode()
        keys += batch["key"]
    assert len(keys) == len(set(keys)) == 16  # 2 workers x one 10-sample shard: full batches of 4 only
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val_keys) == sorted(_members(emb / "val-000000.tar"))


def _join_dm(shapes: Path, emb: Path, **kw) -> ImageEmbeddingDataModule:
    args = dict(embeddings=str(emb), train_shards=str(shapes / "train-*.tar"), val_shards=str(shapes / "val-*.tar"), image_size=32, shuffle_buffer=8, val_samples=100, tokenizer=CLIP, loader=LoaderConfig(batch_size=4, num_workers=2))
    dm = ImageEmbeddingDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_image_join_is_aligned_under_shuffling(exported):
    """Re-encoding each joined image gives exactly its joined z_i: images and embeddings align."""
    shapes, emb, clip = exported
    seen = []
    for batch in _join_dm(shapes, emb).train_dataloader():
        assert batch["image"].shape == (4, 3, 32, 32) and batch["text_mask"].shape[0] == 4
        torch.testing.assert_close(clip.encode_image(batch["image"]), batch["image_embed"], atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.encode_text(batch["tokens"]).embed, batch["text_embed"], atol=1e-5, rtol=0)
        seen += batch["key"]
    assert len(seen) == len(set(seen)) == 16  # as above: 2 workers drop their partial batch


def test_embedding_pipelines_pickle(exported):
    """The prior's and the decoder's pipelines pickle (workers started by spawn / forkserver get
    them that way): a copy yields the same batches, the join reopening its shard files."""
    shapes, emb, _ = exported
    prior_dm = EmbeddingDataModule(str(emb / "train-*.tar"), str(emb / "val-*.tar"), val_samples=100)
    prior_dm.setup("fit")
    for dm in (prior_dm, _join_dm(shapes, emb)):  # _join_dm has run setup
        pipe = dm.val_dataloader().dataset
        original, copy = list(pipe), list(pickle.loads(pickle.dumps(pipe)))
        assert len(original) == len(copy) > 0
        for a, b in zip(original, copy):
            assert a.keys() == b.keys() and a["key"] == b["key"]
            for name, value in a.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, b[name], rtol=0, atol=0)


def test_join_counts_missing_and_rejects_stale_embeddings(exported, tmp_path: Path):
    shapes, emb, _ = exported
    members = _members(emb / "val-000000.tar")
    keys = list(members)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (broken / name).write_bytes((emb / name).read_bytes())

    def write(drop: str | None, recaption: str | None) -> None:
        with tarfile.open(broken / "val-000000.tar", "w") as tar:
            for key, files in members.items():
                for ext, data in files.items():
                    if key == drop:
                        continue
                    if key == recaption and ext == Member.CAPTION.value:
                        data = b"a purple triangle"
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    write(drop=keys[3], recaption=None)
    batches = list(_join_dm(shapes, broken, loader=LoaderConfig(num_workers=0)).val_dataloader())
    got = [k for b in batches for k in b["key"]]
    assert got == [k for k in keys if k != keys[3]]
    assert sum(b["skipped"].get("missing_embedding", 0) for b in batches) == 1
    write(drop=None, recaption=keys[5])
    with pytest.raises(EmbeddingJoinError, match=f"sample {keys[5]}.*stale"):
        list(_join_dm(shapes, broken, loader=LoaderConfig(num_workers=0)).val_dataloader())
    (broken / "train-000001.tar").unlink()
    with pytest.raises(EmbeddingJoinError, match="no embedding shard"):
        _join_dm(shapes, broken)


def test_load_npy_reads_plain_headers_without_ast_and_falls_back_to_numpy(monkeypatch):
    """`load_npy` parses what `np.save` writes itself (numpy's `ast.literal_eval` header parser can
    fail spuriously in forked workers on CPython < 3.11.8); other headers go to `np.load`; a
    truncated array is a ValueError, which the shard reader counts as a bad sample."""
    import ast

    def save(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    plain = [rng.standard_normal(512).astype(np.float32), rng.standard_normal((7, 64)).astype(np.float16),
             rng.standard_normal((2, 3, 4)), np.zeros((0, 8), np.float32), np.float32(3.5),
             np.arange(6, dtype=">f4").reshape(2, 3), np.arange(4, dtype=np.int64)]
    with monkeypatch.context() as patched:
        patched.setattr(ast, "literal_eval", lambda *a, **k: pytest.fail("numpy's header parser ran"))
        for array in plain:
            tensor = load_npy(save(array))
            assert tensor.dtype == torch.float32 and tuple(tensor.shape) == array.shape
            np.testing.assert_array_equal(tensor.numpy(), array.astype(np.float32))
    fortran = np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))
    np.testing.assert_array_equal(load_npy(save(fortran)).numpy(), fortran)
    with pytest.raises(ValueError):
        load_npy(save(plain[0])[:-4])
