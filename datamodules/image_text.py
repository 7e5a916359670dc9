"""`ImageTextDataModule`: img2dataset-layout image/caption shards -> batches for any stage.

Batches are dicts: `image` (B, 3, S, S) in [-1, 1], `tokens` (B, context_length) open_clip token
ids, `caption` list[str], `key` list[str], `skipped` {reason: count} since the last batch of the
same loader worker (see `steps.SkipCounter`).
"""

from __future__ import annotations

import itertools
import multiprocessing
from dataclasses import asdict, dataclass
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules import shards, steps
from datamodules.layout import ReadLayout
from datamodules.negatives import AddNegatives, CaptionNegatives
from datamodules.steps import Sample
from modules.core.hparams import check_range


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoader settings shared by every DataModule (`data.init_args.loader` in YAML)."""

    batch_size: int = 32
    val_batch_size: int | None = None  # None: batch_size
    num_workers: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    # how loader workers start: None is the platform's default (fork on Linux); "forkserver" or
    # "spawn" start them without forking a process that may be running threads
    multiprocessing_context: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "val_batch_size", "prefetch_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"loader.{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"loader.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        methods = multiprocessing.get_all_start_methods()
        if self.multiprocessing_context is not None and self.multiprocessing_context not in methods:
            raise ValueError(f"loader.multiprocessing_context: {self.multiprocessing_context!r} is not one of {methods}")

    def batch(self, train: bool) -> int:
        """Samples per batch of the training or the validation loader."""
        return self.batch_size if train else (self.val_batch_size or self.batch_size)

    def loader_kwargs(self) -> dict[str, Any]:
        """DataLoader keyword arguments (batching is the pipeline's: `batch_size=None`)."""
        workers = self.num_workers
        return dict(
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            multiprocessing_context=start_context(self.multiprocessing_context) if workers > 0 else None,
        )


# What a forkserver imports once, before it forks any worker: the pipeline's classes and their
# imports (torch, webdataset, PIL) and open_clip (the tokenizer's), so a worker does not import
# them itself (open_clip alone takes seconds).
FORKSERVER_PRELOAD = ["datamodules.embeddings", "open_clip"]


def start_context(method: str | None) -> multiprocessing.context.BaseContext | None:
    """The multiprocessing context for loader workers (None: the platform's default).

    A forkserver forks workers from a single-threaded server process. Forking the training
    process itself, which runs threads, can deadlock the child on CPython < 3.11.8
    (python/cpython#112275: seen here as a DDP rank stuck waiting for its worker)."""
    if method is None:
        return None
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


# Lightning's training loop fetches one batch ahead of the step it runs (`_PrefetchDataFetcher`,
# prefetch_batches=1): while batch k is trained, k + 1 has already been taken from the loader.
FETCH_AHEAD = 1


def epoch_steps(dataset: Any) -> list[Any]:
    """The steps of a WebDataset pipeline whose stream depends on the epoch (`set_epoch`)."""
    steps_ = [dataset, *getattr(dataset, "pipeline", [])]
    return [s for s in steps_ if callable(getattr(s, "set_epoch", None))]


class EpochLoader(DataLoader):
    """A DataLoader over a WebDataset pipeline that knows its epoch and can resume mid-epoch.

    Before each pass it tells every epoch-aware step (shard shuffle, resampler, sample shuffle)
    the epoch, so a pass is a deterministic function of (seed, epoch, rank, world size,
    num_workers). It is Lightning-`_Stateful`: `state_dict()` is the data position -- the epoch in
    progress and the number of batches the training loop has consumed -- and after
    `load_state_dict` the next pass replays that epoch and drops the consumed batches.
    webdataset streams tar files and cannot seek, so the position is restored by replay (the
    consumed batches are read and decoded again, not trained on); it is exact when the seed,
    world size and num_workers are those of the interrupted run.
    """

    def __init__(self, dataset: Any, shard_list: shards.ShardList | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        found = epoch_steps(dataset)
        self._epoch_steps = found + ([shard_list] if shard_list is not None and shard_list not in found else [])
        self.epoch = 0
        self._passes = 0  # passes started (0: not iterated yet)
        self._yielded = 0  # batches handed out in the current pass (replayed ones included)
        self._exhausted = False
        self._skip = 0

    def __iter__(self):  # type: ignore[override]
        epoch, skip = self.epoch, self._skip
        for step in self._epoch_steps:
            step.set_epoch(epoch)
        self.epoch, self._skip, self._passes = epoch + 1, 0, self._passes + 1
        self._yielded, self._exhausted = skip, False
        return self._batches(super().__iter__(), skip)

    def _batches(self, it: Any, skip: int) -> Any:
        for _ in itertools.islice(it, skip):  # replay the consumed part of the epoch
            pass
        for batch in it:
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "batches" consumed in it, "complete": the pass has ended}."""
        if self._passes == 0:
            return {"epoch": self.epoch, "batches": self._skip, "complete": False}
        ahead = 0 if self._exhausted else FETCH_AHEAD
        return {"epoch": self.epoch - 1, "batches": max(0, self._yielded - ahead), "complete": self._exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`: the next pass is the saved epoch minus its consumed batches."""
        if state.get("complete"):
            self.epoch, self._skip = int(state["epoch"]) + 1, 0
        else:
            self.epoch, self._skip = int(state["epoch"]), int(state["batches"])


def tokenizer_by_name(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for a model name (the CLIP BPE ships with open_clip; no download)."""
    import open_clip

    return open_clip.get_tokenizer(name)


class CaptionBatch:
    """Collate: fields stacked (`steps.stack_fields`), the captions' open_clip `tokens` (when a
    tokenizer is named) and the `skipped` counts since the previous batch of this worker.

    Pickles by the tokenizer's name: a loader worker started by spawn / forkserver builds its own.
    """

    def __init__(self, counter: steps.SkipCounter, tokenizer: str | None,
                 tokenize: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        self.counter, self.tokenizer, self._tokenize = counter, tokenizer, tokenize

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenize": None}

    def __call__(self, samples: list[Sample]) -> Sample:
        batch = steps.stack_fields(samples)
        if self.tokenizer is not None:
            if self._tokenize is None:
                self._tokenize = tokenizer_by_name(self.tokenizer)
            batch["tokens"] = self._tokenize(batch["caption"])
            if "negatives" in batch:  # (B, k, L): hard-negative captions of each sample
                k = len(batch["negatives"][0])
                flat = [text for row in batch["negatives"] for text in row]
                batch["negative_tokens"] = self._tokenize(flat).view(len(samples), k, -1)
        batch["skipped"] = self.counter.delta()
        return batch


class ImageTextDataModule(pl.LightningDataModule):
    """Image + caption WebDataset shards.

    Args:
        train_shards / val_shards: local paths with brace expansion or globs.
        image_size: output side; images are resized (short side) and centre-cropped.
        resampled: sample shards with replacement (DDP-safe, multi-epoch); then `epoch_samples`
            sets the number of samples per rank and epoch. Otherwise every sample is read exactly
            once per epoch, shards dealt over ranks then workers.
        val_samples: fixed number of validation samples (the first ones in shard order).
        tokenizer: open_clip model name whose tokenizer encodes captions (None: no tokens).
        hflip: random horizontal flips; a flipped sample's caption and hard negatives have their
            "left" / "right" swapped (`steps.mirror_caption`, unless `mirror_captions` is off), so
            relation captions stay true of the flipped image.
        negatives: hard-negative captions for contrastive training (`datamodules.negatives`:
            `ShapesNegatives`, `WordSwapNegatives`); training batches then carry
            `negative_tokens` (B, k, L) and may carry rephrased positives. None: plain captions.
        layout_slots: > 0: every sample's `{key}.json` gives its objects' boxes and phrases, up to this
            many (`datamodules.layout.ReadLayout`); batches then carry `layout_boxes` (B, K, 4),
            `layout_mask` (B, K), `layout_phrases` (B lists of K strings) and `layout_relation` (B
            strings). 0: no layout.
        allow_pipe: allow `pipe:` shard URLs (they run shell commands).
        loader: batch sizes, workers and how they start (`LoaderConfig`; its
            `multiprocessing_context` "spawn" / "forkserver" work too: the pipeline pickles).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        image_size: int = 64,
        loader: LoaderConfig | None = None,
        seed: int = 0,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        val_samples: int = 256,
        tokenizer: str | None = "ViT-B-32",
        hflip: bool = False,
        mirror_captions: bool = True,
        negatives: CaptionNegatives | None = None,
        max_caption_bytes: int = 4096,
        layout_slots: int = 0,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        check_range("data", "layout_slots", layout_slots, 0, 64)
        self.loader = loader or LoaderConfig()
        self.negatives = negatives
        self.save_hyperparameters(ignore=["loader", "negatives"])
        self.hparams["loader"] = asdict(self.loader)  # plain data: checkpoints load with weights_only=True
        self.hparams["negatives"] = None if negatives is None else {"class": type(negatives).__name__, **vars(negatives)}
        self._tokenizer = tokenizer_by_name(tokenizer) if tokenizer else None  # an unknown name fails here
        self.rank, self.world_size = 0, 1

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        # Fail early, in the main process, with one line naming the pattern.
        self.train_urls = shards.expand_shards(self.hparams.train_shards, allow_pipe=self.hparams.allow_pipe)
        if stage in (None, "fit") and not self.hparams.resampled:
            shards.check_even_split(self.train_urls, self.world_size)
        val = self.hparams.val_shards
        self.val_urls = shards.expand_shards(val, allow_pipe=self.hparams.allow_pipe) if val else []

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False) if self.val_urls else []

    # -- pipeline -----------------------------------------------------------------------------
    def extra_fields(self) -> tuple[str, ...]:
        """Further tar members each sample must carry (subclasses join embeddings by key)."""
        return ()

    def finish_steps(self) -> list[Callable[[Any], Any]]:
        """Pipeline steps after the image transform (subclasses join extra fields); picklable."""
        return []

    def collate(self, counter: steps.SkipCounter) -> Callable[[list[Sample]], Sample]:
        """The batch collate (picklable): see `CaptionBatch`."""
        return CaptionBatch(counter, self.hparams.tokenizer, self._tokenizer)

    def pipeline(self, urls: list[str], *, train: bool) -> tuple[wds.DataPipeline, shards.ShardList | None]:
        hp, counter = self.hparams, steps.SkipCounter()
        rules = steps.CaptionRules(max_bytes=hp.max_caption_bytes)
        shard_list = None
        if train and hp.resampled:
            head = [shards.ResampledShards(urls, seed=hp.seed + self.rank), shards.split_by_worker]
        else:
            shard_list = shards.ShardList(urls, seed=hp.seed, shuffle=train)
            head = [shard_list] + ([shards.SplitByNode(self.rank, self.world_size), shards.split_by_worker] if train else [])
        body = [
            steps.TarToSamples(counter),
            steps.DecodeSamples(counter, rules, extra=self.extra_fields() + (("json",) if hp.layout_slots else ())),
        ]
        if hp.layout_slots:
            body.append(ReadLayout(counter, hp.layout_slots))
        if train and self.negatives is not None:
            body.append(AddNegatives(self.negatives, hp.seed + self.rank))
        if train:
            body.append(steps.SampleShuffle(hp.shuffle_buffer, hp.seed, self.rank))
        else:
            body.append(steps.TakeStrided(hp.val_samples, self.rank, self.world_size))
        body += [
            steps.ImageTransform(hp.image_size, hflip=train and hp.hflip, seed=hp.seed, rank=self.rank,
                                 mirror_captions=hp.mirror_captions),
            *self.finish_steps(),
        ]
        batch_size = self.loader.batch(train)
        body.append(steps.BatchSamples(batch_size, self.collate(counter), partial=not train))
        pipe = wds.DataPipeline(*head, *body)
        if train and hp.resampled and hp.epoch_samples:
            workers = max(1, self.loader.num_workers)
            pipe = pipe.with_epoch(max(1, hp.epoch_samples // (batch_size * workers)))
        return pipe, shard_list

    def _loader(self, urls: list[str], *, train: bool) -> DataLoader:
        pipe, shard_list = self.pipeline(urls, train=train)
        return EpochLoader(pipe, shard_list, **self.loader.loader_kwargs())
