"""Prediction writer for `unclip embed`: streams CLIP embeddings into shards named like the source.

Each source shard gets `out/<name>.tmp` while its batches arrive and is renamed to `out/<name>`
(`os.replace`, atomic) when its end-of-shard marker comes, so a shard file that exists is
complete and a rerun can skip it. Several shards may be open at once (one per loader worker).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm import tqdm

from datamodules.embeddings import add_member, sample_members


class EmbeddingWriter(BasePredictionWriter):
    """Writes `CLIPEmbedder.predict_step` outputs; `fp16` stores arrays as float16."""

    def __init__(self, out: str | Path, fp16: bool = False, total_shards: int | None = None, progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.out, self.dtype = Path(out), np.float16 if fp16 else np.float32
        self.open: dict[str, tarfile.TarFile] = {}
        self.samples, self.shards_done = 0, 0
        self.skipped: dict[str, int] = {}
        self.bar = tqdm(total=total_shards, unit="shard", disable=not progress, dynamic_ncols=True)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        name = prediction["shard"]
        if prediction.get("end_of_shard"):
            self._finish(name, prediction)
            return
        if name not in self.open:
            self.open[name] = self._open_tmp(name)
        tar = self.open[name]
        lengths = prediction["text_mask"].sum(dim=1).tolist()  # real tokens per caption
        for i, key in enumerate(prediction["key"]):
            members = sample_members(
                key,
                prediction["caption"][i],
                prediction["image_embed"][i],
                prediction["text_embed"][i],
                prediction["text_tokens"][i, : lengths[i]],  # (L_i, W)
                self.dtype,
            )
            for member, data in members:
                add_member(tar, member, data)
        self.samples += len(prediction["key"])
        self.bar.set_postfix(samples=self.samples, refresh=False)

    def _open_tmp(self, name: str) -> tarfile.TarFile:
        return tarfile.open(self.out / f"{name}.tmp", "w", format=tarfile.USTAR_FORMAT)

    def _finish(self, name: str, marker: dict[str, Any]) -> None:
        # a shard without one usable sample still gets its (empty) file, so reruns skip it
        tar = self.open.pop(name) if name in self.open else self._open_tmp(name)
        tar.close()
        os.replace(self.out / f"{name}.tmp", self.out / name)
        for reason, n in marker.get("skipped", {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.shards_done += 1
        self.bar.update(1)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, tar in self.open.items():  # only after an interrupted loader: never rename
            tar.close()
            (self.out / f"{name}.tmp").unlink(missing_ok=True)
        self.open.clear()
        self.bar.close()
