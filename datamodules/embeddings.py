"""Precomputed CLIP embeddings: the shard format `unclip embed` writes, and the DataModules that read it.

An embedding shard is named like the image shard it was computed from (`OUT/train-000000.tar` for
`.../train-000000.tar`) and holds, per sample key of the source (same keys, same order; samples
the source pipeline skips are absent):

    {key}.img_emb.npy     (D,)    z_i, unit norm
    {key}.txt_emb.npy     (D,)    z_t, unit norm
    {key}.txt_tokens.npy  (L, W)  last-layer CLIP text hidden states of the caption's real tokens
                                  (SOT .. EOT, so the mask is implicit: all L rows are valid)
    {key}.txt             the caption (UTF-8), checked on every join so stale shards cannot pass

Arrays are `.npy` (float32, or float16 with `--fp16`), read with `allow_pickle=False`.
`OUT/meta.json` records the CLIP model, weights and storage dtype of the whole folder.

- `EmbeddingDataModule` (prior): batches of `image_embed` (B, D), `text_embed` (B, D),
  `text_tokens` (B, L_max, W) zero-padded, `text_mask` (B, L_max) bool, `key`, `caption`, `skipped`.
- `ImageEmbeddingDataModule` (decoder): `ImageTextDataModule` batches plus the same embedding
  fields, joined by key from the embedding shard named like each image shard.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from datamodules import shards, steps
from datamodules.image_text import EpochLoader, ImageTextDataModule, LoaderConfig, tokenizer_by_name
from datamodules.steps import Sample
from modules.core.errors import DataError
from modules.core.files import write_text_atomic

META_FILE = "meta.json"
EMBED_FIELDS = ("image_embed", "text_embed", "text_tokens", "text_mask")


class Member(str, Enum):
    """Tar member extensions of one embedding sample."""

    IMAGE_EMBED = "img_emb.npy"
    TEXT_EMBED = "txt_emb.npy"
    TEXT_TOKENS = "txt_tokens.npy"
    CAPTION = "txt"


class EmbeddingJoinError(DataError):
    """Image and embedding shards disagree (a stale or foreign embedding folder)."""


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# The header `np.save` writes for a plain array: {'descr': '<f4', 'fortran_order': False, 'shape': (77, 512), }
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?(?:f[248]|[iu][1248]))', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \}\s*")


def load_npy(data: bytes) -> Tensor:
    """A `.npy` member as a float32 tensor (`allow_pickle=False` semantics).

    The plain headers `np.save` writes are read here by a strict pattern; anything else goes to
    `np.load`. numpy parses headers with `ast.literal_eval`, and CPython before 3.11.8 can fail
    that in a forked DataLoader worker with a spurious `SystemError: AST constructor recursion depth
    mismatch` (python/cpython#106905; seen in `tests/test_resume.py`)."""
    if data[:6] == _NPY_MAGIC and data[6] in (1, 2, 3):
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes
        header_len = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.fullmatch(data[start:start + header_len].decode("latin1"))
        if match is not None:
            descr, dims = match.groups()
            shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
            array = np.frombuffer(data, dtype=np.dtype(descr), count=int(np.prod(shape)), offset=start + header_len)
            return torch.from_numpy(array.reshape(shape).astype(np.float32))
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def sample_members(key: str, caption: str, image_embed: Tensor, text_embed: Tensor, text_tokens: Tensor, dtype: np.dtype) -> list[tuple[str, bytes]]:
    """Tar members of one sample; `text_tokens` (L, W) holds only the caption's real tokens."""
    arrays = {Member.IMAGE_EMBED: image_embed, Member.TEXT_EMBED: text_embed, Member.TEXT_TOKENS: text_tokens}
    members = [(f"{key}.{m.value}", npy_bytes(t.detach().float().cpu().numpy().astype(dtype))) for m, t in arrays.items()]
    return members + [(f"{key}.{Member.CAPTION.value}", caption.encode("utf-8"))]


def decode_members(key: str, raw: dict[str, bytes]) -> Sample:
    """{extension: bytes} of one sample -> {"key", "caption", "image_embed", "text_embed", "text_tokens"}."""
    return {
        "key": key,
        "caption": raw[Member.CAPTION.value].decode("utf-8"),
        "image_embed": load_npy(raw[Member.IMAGE_EMBED.value]),  # (D,)
        "text_embed": load_npy(raw[Member.TEXT_EMBED.value]),  # (D,)
        "text_tokens": load_npy(raw[Member.TEXT_TOKENS.value]),  # (L, W)
    }


def pad_tokens(tokens: list[Tensor], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
    """[(L_i, W)] -> zero-padded (B, L, W) and mask (B, L), L = max L_i (or `pad_to`, truncating)."""
    length = pad_to or max(t.shape[0] for t in tokens)
    out = tokens[0].new_zeros((len(tokens), length, tokens[0].shape[-1]))
    mask = torch.zeros((len(tokens), length), dtype=torch.bool)
    for i, t in enumerate(tokens):
        n = min(t.shape[0], length)
        out[i, :n], mask[i, :n] = t[:n], True
    return out, mask


def collate_embeddings(samples: list[Sample], pad_to: int | None = None) -> Sample:
    """Stack embedding samples; variable-length token encodings are padded with a mask."""
    tokens = [s.pop("text_tokens") for s in samples]
    batch = steps.stack_fields(samples)
    batch["text_tokens"], batch["text_mask"] = pad_tokens(tokens, pad_to)
    return batch


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def is_complete_tar(path: Path) -> bool:
    """True when `path` exists and its member headers read to the end without error."""
    try:
        with tarfile.open(path, "r:") as tar:
            tar.getmembers()
        return True
    except (OSError, tarfile.TarError):
        return False


def check_meta(out: Path, meta: dict[str, Any]) -> None:
    """Write `meta.json`, or check that an existing one describes the same export."""
    path = out / META_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise EmbeddingJoinError(f"{out} holds another export ({diff}); choose another output folder")
        return
    write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Export input: image/caption batches, whole shards per worker, an end marker after each shard
# ---------------------------------------------------------------------------------------------
class ExportBatches(IterableDataset):
    """Batches of one source shard at a time for `unclip embed`, in source order.

    Each loader worker takes whole shards; after a shard's last batch comes
    `{"end_of_shard": True, "shard": name, "count": n, "skipped": {...}}` so the writer can close
    it. Batches carry `shard` (the source file name), `key`, `caption`, `image`, `tokens`.
    """

    def __init__(self, urls: list[str], image_size: int, batch_size: int, tokenizer: str) -> None:
        super().__init__()
        self.urls, self.image_size, self.batch_size, self.tokenizer = list(urls), image_size, batch_size, tokenizer

    def __iter__(self) -> Iterator[Sample]:
        tokenize = tokenizer_by_name(self.tokenizer)
        for url in shards.split_by_worker(self.urls):
            counter, name, count = steps.SkipCounter(), Path(url).name, 0

            def collate(samples: list[Sample]) -> Sample:
                batch = steps.stack_fields(samples)
                return {**batch, "tokens": tokenize(batch["caption"]), "shard": name}

            pipe = wds.DataPipeline(
                shards.ShardList([url], shuffle=False),
                steps.TarToSamples(counter),
                steps.DecodeSamples(counter),
                steps.ImageTransform(self.image_size),
                steps.BatchSamples(self.batch_size, collate),
            )
            for batch in pipe:
                count += len(batch["key"])
                yield batch
            yield {"end_of_shard": True, "shard": name, "count": count, "skipped": counter.delta()}


# ---------------------------------------------------------------------------------------------
# Prior: embedding shards only
# ---------------------------------------------------------------------------------------------
class DecodeEmbeddings:
    """Raw tar members -> decoded embedding samples; incomplete samples are counted and skipped."""

    def __init__(self, counter: steps.SkipCounter) -> None:
        self.counter = counter

    def __call__(self, src: Iterable[Sample]) -> Iterator[Sample]:
        for raw in src:
            key = raw.get("__key__", "?")
            try:
                yield decode_members(key, raw)
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                self.counter.skip(f"bad_embedding ({type(exc).__name__})", f"{key} in {raw.get('__url__', '?')}")


class EmbeddingBatch:
    """Collate of embedding samples (`collate_embeddings`) with the `skipped` counts since the
    previous batch of this worker."""

    def __init__(self, counter: steps.SkipCounter, pad_to: int | None) -> None:
        self.counter, self.pad_to = counter, pad_to

    def __call__(self, samples: list[Sample]) -> Sample:
        return {**collate_embeddings(samples, self.pad_to), "skipped": self.counter.delta()}


class EmbeddingDataModule(pl.LightningDataModule):
    """Embedding shards written by `unclip embed` (the prior's input). See the module docstring.

    Args mirror `ImageTextDataModule`; `pad_to` fixes the padded token length (None: batch max).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        loader: LoaderConfig | None = None,
        seed: int = 0,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        val_samples: int = 1024,
        pad_to: int | None = None,
    ) -> None:
        super().__init__()
        self.loader = loader or LoaderConfig(batch_size=64)
        self.save_hyperparameters(ignore=["loader"])
        self.hparams["loader"] = asdict(self.loader)  # plain data: checkpoints load with weights_only=True
        self.rank, self.world_size = 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        self.train_urls = shards.expand_shards(self.hparams.train_shards)
        if stage in (None, "fit") and not self.hparams.resampled:
            shards.check_even_split(self.train_urls, self.world_size)
        self.val_urls = shards.expand_shards(self.hparams.val_shards) if self.hparams.val_shards else []

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False) if self.val_urls else []

    def pipeline(self, urls: list[str], *, train: bool) -> tuple[wds.DataPipeline, shards.ShardList | None]:
        hp, counter, shard_list = self.hparams, steps.SkipCounter(), None
        if train and hp.resampled:
            head = [shards.ResampledShards(urls, seed=hp.seed + self.rank), shards.split_by_worker]
        else:
            shard_list = shards.ShardList(urls, seed=hp.seed, shuffle=train)
            head = [shard_list] + ([shards.SplitByNode(self.rank, self.world_size), shards.split_by_worker] if train else [])
        body = [steps.TarToSamples(counter), DecodeEmbeddings(counter)]
        if train:
            body.append(steps.SampleShuffle(hp.shuffle_buffer, hp.seed, self.rank))
        else:
            body.append(steps.TakeStrided(hp.val_samples, self.rank, self.world_size))
        batch_size = self.loader.batch(train)
        collate = EmbeddingBatch(counter, hp.pad_to)
        pipe = wds.DataPipeline(*head, *body, steps.BatchSamples(batch_size, collate, partial=not train))
        if train and hp.resampled and hp.epoch_samples:
            pipe = pipe.with_epoch(max(1, hp.epoch_samples // (batch_size * max(1, self.loader.num_workers))))
        return pipe, shard_list

    def _loader(self, urls: list[str], *, train: bool) -> DataLoader:
        pipe, shard_list = self.pipeline(urls, train=train)
        return EpochLoader(pipe, shard_list, **self.loader.loader_kwargs())


# ---------------------------------------------------------------------------------------------
# Decoder: image shards joined with embedding shards by key
# ---------------------------------------------------------------------------------------------
class ShardIndex:
    """Random access to the members of one uncompressed tar: key -> {extension: (offset, size)}."""

    def __init__(self, path: Path) -> None:
        self.path, self.members = path, {}
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                self.members.setdefault(key, {})[ext] = (info.offset_data, info.size)
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, key: str) -> dict[str, bytes] | None:
        entry = self.members.get(key)
        if entry is None:
            return None
        return {ext: os.pread(self.fd, size, offset) for ext, (offset, size) in entry.items()}

    def close(self) -> None:
        os.close(self.fd)


class EmbeddingJoin:
    """Looks up the embeddings of (image shard URL, key) in `folder`/<shard file name>.

    Keeps the indices of the few most recent shards (a shuffle buffer mixes a handful); file
    handles are per process (`os.pread`, reopened after a fork).
    """

    def __init__(self, folder: str | Path, cache: int = 8) -> None:
        self.folder, self.cache = Path(folder), cache
        self._indices: OrderedDict[str, ShardIndex] = OrderedDict()
        self._pid = os.getpid()

    def paired(self, url: str) -> Path:
        return self.folder / Path(url).name

    def lookup(self, url: str, key: str) -> Sample | None:
        if self._pid != os.getpid():  # forked into a loader worker: do not share descriptors
            self._indices, self._pid = OrderedDict(), os.getpid()
        index = self._indices.get(url)
        if index is None:
            index = self._indices[url] = ShardIndex(self.paired(url))
            if len(self._indices) > self.cache:
                self._indices.popitem(last=False)[1].close()
        self._indices.move_to_end(url)
        raw = index.read(key)
        return decode_members(key, raw) if raw is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_indices": OrderedDict(), "_pid": -1}


class ImageEmbeddingDataModule(ImageTextDataModule):
    """`ImageTextDataModule` whose batches also carry the exported embeddings of each sample.

    Args (besides `ImageTextDataModule`'s):
        embeddings: folder written by `unclip embed` from the same image shards.
        pad_to: fixed padded token length (None: batch max).
    A sample without embeddings is skipped and counted (`missing_embedding`); a caption that
    differs from the one stored with its embeddings raises `EmbeddingJoinError`. Flips are
    refused: z_i was computed on the unflipped image.
    """

    def __init__(self, embeddings: str, pad_to: int | None = None, **kwargs: Any) -> None:
        if kwargs.get("hflip"):
            raise ValueError("hflip would pair flipped images with the z_i of unflipped ones; export flipped embeddings instead")
        super().__init__(**kwargs)
        self.join = EmbeddingJoin(embeddings)
        self.pad_to = pad_to

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for url in [*self.train_urls, *self.val_urls]:
            if not self.join.paired(url).is_file():
                raise EmbeddingJoinError(f"no embedding shard {self.join.paired(url)} for image shard {url}")

    def extra_fields(self) -> tuple[str, ...]:
        return ("__url__",)  # the join needs the image shard each sample came from

    def finish_steps(self) -> list[Callable[[Any], Any]]:
        return [wds.map(JoinEmbeddings(self.join))]  # pickles, as its function does

    def collate(self, counter: steps.SkipCounter) -> Callable[[list[Sample]], Sample]:
        return JoinedBatch(super().collate(counter), counter, self.join.folder, self.pad_to)


class JoinEmbeddings:
    """Per sample: the exported embeddings of (image shard, key) added to it, or a
    `missing_embedding` mark; a caption other than the exported one raises `EmbeddingJoinError`."""

    def __init__(self, join: EmbeddingJoin) -> None:
        self.join = join

    def __call__(self, sample: Sample) -> Sample:
        url = sample.pop("__url__")
        emb = self.join.lookup(url, sample["key"])
        if emb is None:
            return {**sample, "missing_embedding": f"{sample['key']} in {url}"}
        if emb["caption"] != sample["caption"]:
            raise EmbeddingJoinError(
                f"sample {sample['key']} of {url}: caption {sample['caption']!r} but its embeddings in "
                f"{self.join.paired(url)} were computed for {emb['caption']!r} (stale export?)"
            )
        return {**sample, **{k: v for k, v in emb.items() if k not in ("key", "caption")}}


class JoinedBatch:
    """Collate of joined samples: those marked `missing_embedding` counted and dropped, the rest
    collated by `base` with their caption token encodings padded (`text_tokens`, `text_mask`)."""

    def __init__(self, base: Callable[[list[Sample]], Sample], counter: steps.SkipCounter, folder: Path,
                 pad_to: int | None) -> None:
        self.base, self.counter, self.folder, self.pad_to = base, counter, folder, pad_to

    def __call__(self, samples: list[Sample]) -> Sample:
        for s in samples:
            if "missing_embedding" in s:
                self.counter.skip("missing_embedding", s["missing_embedding"])
        samples = [s for s in samples if "missing_embedding" not in s]
        if not samples:
            raise EmbeddingJoinError(f"no sample of a batch has embeddings in {self.folder}")
        tokens = [s.pop("text_tokens") for s in samples]
        batch = self.base(samples)
        batch["text_tokens"], batch["text_mask"] = pad_tokens(tokens, self.pad_to)
        return batch
