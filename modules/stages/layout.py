"""Layout stage: P(boxes | caption, phrases), the plan the layout-grounded decoder draws from.

unCLIP's decoder has to invent where each object goes from z_i and the caption, and does not bind
objects to places (Ramesh et al. 2022 §7; measured here: the relation of two drawn objects is at
chance). LLM-grounded diffusion (Lian et al. 2023) and LayoutGPT (Feng et al. 2023) plan boxes from
the prompt first and ground the image generator in them (GLIDE-style maps here, GLIGEN's boxes
there). This stage learns the plan: a diffusion model over the K boxes (`LayoutPrior`, DDPM
Algorithm 1 on x_0 = 2·box − 1, empty slots at 0), conditioned on the caption's scene graph as
sg2im (Johnson et al. 2018) predicts boxes from one: each slot's phrase embedding (the frozen
CLIP's) and the relation between the first two objects. The graph comes from the caption's parse (the
shapes grammar's, `phrase_parser: shapes`: an object per noun phrase in the order the caption names
them, and the relation word between them); in training, from each sample's json (`data.layout_slots`).
At sampling, a plan whose boxes break the layout rule the data's writer follows (sides, and the
relation's gap and overlap) is drawn again, up to `plan_tries` draws (rejection sampling): the
decoder never saw such a layout, and draws touching same-coloured objects as one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from modules.core import optim
from modules.core.errors import ConfigError, UserError
from modules.core.hparams import as_config, check_range, init_args, to_plain
from modules.diffusion import Objective
from modules.diffusion.config import Clipping, DiffusionConfig, SamplingConfig, noise, sample
from modules.networks.clip import FrozenCLIP
from modules.networks.layout import LayoutPrior, LayoutPriorConfig
from modules.stages.conditioning import ClipConditioner, phrase_embeddings
from modules.stages.registry import class_path_of
from modules.stages.validation import log_fixed_timestep_losses

PARSERS = ("shapes",)


def shapes_graph(caption: str) -> tuple[list[str], str]:
    """The shapes grammar's scene graph of a caption: object phrases in caption order and the relation
    ("" for one object); ([], "") if it does not parse."""
    from datamodules.shapes.grammar import parse_caption, phrase

    try:
        objects, relation, _ = parse_caption(caption)
    except ValueError:
        return [], ""
    return [phrase(o._asdict()) for o in objects], relation or ""


def shapes_relations() -> tuple[str, ...]:
    from datamodules.shapes.grammar import RELATIONS

    return RELATIONS


def shapes_rule(boxes: list[list[float]], relation: str) -> bool:
    """Whether a plan's boxes (its objects' only) could be a shapes layout (`follows_layout_rule`):
    sides in the writer's range, and two objects in the relation, apart, with the writer's gap."""
    from datamodules.shapes.scene import follows_layout_rule

    return not boxes or follows_layout_rule(boxes, relation or None)


def boxes_to_x0(boxes: Tensor, mask: Tensor) -> Tensor:
    """Boxes (B, K, 4) in [0, 1] -> diffusion data in [-1, 1]; empty slots are 0."""
    return torch.where(mask[..., None].bool(), boxes * 2 - 1, 0.0)


def x0_to_boxes(x0: Tensor) -> Tensor:
    """Sampled data (B, K, 4) -> boxes in [0, 1] with x0 <= x1 and y0 <= y1."""
    b = ((x0.float() + 1) / 2).clamp(0.0, 1.0)
    lo, hi = torch.minimum(b[..., :2], b[..., 2:]), torch.maximum(b[..., :2], b[..., 2:])
    return torch.cat([lo, hi], dim=-1)


class LayoutModule(pl.LightningModule):
    """Trains the layout prior; `generate` samples boxes for captions' phrases.

    Args:
        prior: the Transformer (`LayoutPriorConfig`); its widths are set from the CLIP model.
        clip_model / clip_weights: the frozen CLIP whose phrase embeddings condition the boxes (the
            pipeline's CLIP).
        diffusion / sampling: the process over boxes and its sampler (static clipping to [-1, 1]).
        phrase_parser: how captions are parsed into object phrases and a relation at sampling (`shapes`).
        relations: the relation vocabulary (None: the shapes grammar's); id 0 is "no relation".
        plan_tries: plans drawn per caption at most: a plan whose boxes break the parser's layout rule
            (`shapes_rule`: the data writer's sides, gap and overlap) is drawn again, up to this many
            times in all, and the last draw kept (rejection sampling; 1: the first draw, unchecked).
    """

    def __init__(
        self,
        prior: LayoutPriorConfig | None = None,
        clip_model: str = "tiny-vit",
        clip_weights: str | None = None,
        diffusion: DiffusionConfig | None = None,
        sampling: SamplingConfig | None = None,
        optimizer: optim.OptimConfig | None = None,
        phrase_parser: str = "shapes",
        relations: tuple[str, ...] | None = None,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        seed: int = 0,
        plan_tries: int = 1,
    ) -> None:
        args = init_args(locals())
        super().__init__()
        check_range("model", "plan_tries", plan_tries, 1, 1000)
        if phrase_parser not in PARSERS:
            raise ConfigError(f"model.phrase_parser: {phrase_parser!r} is not one of {list(PARSERS)}")
        self.conditioner = ClipConditioner(clip_model, clip_weights)
        relations = tuple(relations) if relations is not None else shapes_relations()
        args["relations"] = list(relations)
        prior_cfg = dataclasses.replace(as_config(LayoutPriorConfig, prior), embed_dim=self.conditioner.embed_dim,
                                        num_relations=len(relations))
        self.diffusion_cfg = (as_config(DiffusionConfig, diffusion) if diffusion is not None
                              else DiffusionConfig(objective=Objective.V))
        self.sampling = (as_config(SamplingConfig, sampling) if sampling is not None
                         else SamplingConfig(steps=50, clipping=Clipping.STATIC, guidance_scale=1.0))
        self.optim_cfg = as_config(optim.OptimConfig, optimizer)
        self.save_hyperparameters(to_plain({**args, "prior": prior_cfg, "diffusion": self.diffusion_cfg,
                                            "sampling": self.sampling, "_class_path": class_path_of(self)}))
        self.relations = relations
        self.net = LayoutPrior(prior_cfg)
        self.diffusion = self.diffusion_cfg.build()

    @property
    def max_objects(self) -> int:
        return self.net.config.max_objects

    # -- training: DDPM Algorithm 1 over boxes -------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x0, kwargs = self.data(batch)
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
        loss = self.diffusion.training_loss(self.net, x0, t, model_kwargs=kwargs)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, kwargs = self.data(batch)
        gen = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        log_fixed_timestep_losses(self, self.diffusion, self.net, x0, kwargs, self.hparams.val_timesteps, gen)

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.configure(self.net, self.optim_cfg)

    def data(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """(x_0 (B, K, 4), network kwargs) of a batch carrying a layout (`data.layout_slots`)."""
        if "layout_boxes" not in batch:
            raise ConfigError("the layout stage needs batches with layouts: set data.layout_slots")
        if batch["layout_boxes"].shape[1] != self.max_objects:
            raise ConfigError(f"data.layout_slots: {batch['layout_boxes'].shape[1]}, but model.prior.max_objects "
                              f"is {self.max_objects}")
        layout = self.conditioner.layout(batch, batch["layout_boxes"].device)
        layout["layout_relation"] = self.relation_ids(batch["layout_relation"]).to(batch["layout_boxes"].device)
        return boxes_to_x0(layout["layout_boxes"], layout["layout_mask"]), self.kwargs(layout)

    def relation_ids(self, relations: Sequence[str]) -> Tensor:
        """Relation words -> ids (B,): 0 for "" (none), 1 + the index in `relations` otherwise."""
        ids = []
        for relation in relations:
            if relation and relation not in self.relations:
                raise UserError(f"layout relation {relation!r} is not one of model.relations {list(self.relations)}")
            ids.append(self.relations.index(relation) + 1 if relation else 0)
        return torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def kwargs(layout: dict[str, Tensor]) -> dict[str, Tensor]:
        """Network kwargs from a layout's `layout_embeds`, `layout_mask` and `layout_relation` ids."""
        return {"phrase_embeds": layout["layout_embeds"], "slot_mask": layout["layout_mask"],
                "relation": layout["layout_relation"]}

    # -- sampling ----------------------------------------------------------------------------------
    def parse(self, captions: Sequence[str]) -> tuple[list[list[str]], Tensor]:
        """Each caption's object phrases padded with "" to `max_objects` slots, and its relation id (B,).
        A caption that does not parse, or names more objects than there are slots or a relation outside
        `relations`, gets no objects: the decoder then draws it without a layout."""
        rows, relations = [], []
        for caption in captions:
            found, relation = shapes_graph(caption)
            if len(found) > self.max_objects or (relation and relation not in self.relations):
                found, relation = [], ""
            rows.append(found + [""] * (self.max_objects - len(found)))
            relations.append(relation)
        return rows, self.relation_ids(relations)

    @torch.no_grad()
    def generate(self, cond: dict[str, Tensor], *, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Boxes (B, K, 4) in [0, 1] for `cond`: `layout_embeds` (B, K, D), `layout_mask` (B, K) and the
        relation ids `layout_relation` (B,)."""
        kwargs = self.kwargs(cond)
        batch = kwargs["slot_mask"].shape[0]
        x_T = noise((batch, self.max_objects, 4), generator, self.device)
        x0 = sample(self.diffusion, self.net, x_T, sampling or self.sampling, model_kwargs=kwargs, generator=generator)
        return x0_to_boxes(x0)

    @torch.no_grad()
    def plan(self, captions: Sequence[str], *, clip: FrozenCLIP, tokenizer: Any,
             generator: torch.Generator | None = None, cache: dict[str, Tensor] | None = None,
             tries: int | None = None) -> dict[str, Tensor]:
        """The plan for each caption: its parsed phrases embedded by `clip` (`phrase_embeddings`, with
        `cache`) in boxes sampled for them and their relation, as decoder kwargs `layout_boxes` (B, K, 4),
        `layout_embeds` (B, K, D) and `layout_mask` (B, K). Plans that break the layout rule are drawn
        again, only those rows, up to `tries` draws in all (None: the module's `plan_tries`)."""
        phrases, relations = self.parse(captions)
        embeds, mask = phrase_embeddings(clip, tokenizer, phrases, self.device, cache)
        plan = {"layout_embeds": embeds, "layout_mask": mask}
        cond = {**plan, "layout_relation": relations.to(self.device)}
        boxes = self.generate(cond, generator=generator)
        words = [self.relations[i - 1] if i else "" for i in relations.tolist()]
        for _ in range(1, tries or self.hparams.plan_tries):
            broken = [row for row, objects in enumerate(phrases)
                      if not shapes_rule(boxes[row, : sum(map(bool, objects))].tolist(), words[row])]
            if not broken:
                break
            rows = torch.tensor(broken, device=boxes.device)
            boxes[rows] = self.generate({k: v[rows] for k, v in cond.items()}, generator=generator)
        return {**plan, "layout_boxes": boxes}
