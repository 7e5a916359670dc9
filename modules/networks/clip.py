"""CLIP through open_clip: model registry, safe weight loading, and the frozen encoder that later
stages condition on.

Architectures are data: the project's small configs live as JSON in `clip_configs/` and are
registered with open_clip's registry next to the standard names (ViT-B-32, ViT-L-14, ViT-H-14).
"""

from __future__ import annotations

import collections
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from modules.core.safe_load import safe_torch_load

CONFIG_DIR = Path(__file__).parent / "clip_configs"
_registered = False
log = logging.getLogger(__name__)


def register_project_configs() -> None:
    """Add `clip_configs/*.json` to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_clip(model_name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip model by registry name; `pretrained` is a LOCAL weight file (never a hub tag)."""
    register_project_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model_name!r}; known: {', '.join(open_clip.list_models()[:8])}, ...")
    model = open_clip.create_model(model_name, pretrained=None)
    if pretrained:
        load_clip_weights(model, pretrained)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or `torch.load(weights_only=True)` only -- never arbitrary pickle.

    Accepts open_clip's `open_clip_pytorch_model.bin` / `.safetensors`, OpenAI's CLIP files (the
    TorchScript archives OpenAI distributes, read by `read_torchscript_tensors`, or their plain
    state dicts), training checkpoints with a `state_dict` key (open_clip's or Lightning's), and
    strips `module.` / `model.` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif is_torchscript_archive(path):
        state = read_torchscript_tensors(path)
    else:
        state = safe_torch_load(path)  # CheckpointReadError (a ValueError) names the file
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in OPENAI_METADATA_KEYS}


# ---------------------------------------------------------------------------------------------
# OpenAI-format files
# ---------------------------------------------------------------------------------------------
# Scalars OpenAI's scripted CLIP keeps next to its weights (open_clip drops them too).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """A TorchScript zip (`torch.jit.save`, OpenAI's `ViT-B-32.pt`): it carries a `code/` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


class _ScriptedModule:
    """Stand-in for one `__torch__.*` module class: only its attribute dict is kept."""

    def __setstate__(self, state: dict) -> None:
        self.attributes = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: object) -> torch.Tensor:
    return storage.as_strided(size, stride, offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's `data.pkl` allowing tensors and module stand-ins only.

    Any other global (`os.system`, `builtins.eval`, ...) raises, so no code from the file runs;
    the archive's TorchScript `code/` is never compiled either.
    """

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("__torch__."):
            return _ScriptedModule
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        _, dtype, key, _location, _numel = pid  # ("storage", dtype, key, location, numel)
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _module_tensors(module: _ScriptedModule, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in module.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptedModule):
            out.update(_module_tensors(value, f"{prefix}{name}."))
    return out


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a scripted/traced CLIP (OpenAI's distribution format) without running it.

    Reads `data.pkl` with an allow-list unpickler and walks the module tree into a state dict.
    Tensor attributes that are not weights (the text tower's causal `attn_mask`) are dropped.
    """
    with zipfile.ZipFile(path) as archive:
        roots = [name[: -len("/data.pkl")] for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(roots) != 1:
            raise ValueError(f"{path} is not a TorchScript archive with one data.pkl")
        try:
            root = _TorchScriptUnpickler(archive, roots[0]).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"refusing to load {path}: {exc}") from None
    if not isinstance(root, _ScriptedModule):
        raise ValueError(f"{path} does not hold a scripted module")
    return {k: v for k, v in _module_tensors(root).items() if not k.endswith("attn_mask")}


def _warn_if_activation_differs(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """OpenAI's weights (fp16 tensors) were trained with QuickGELU; open_clip's plain names use GELU."""
    from open_clip.transformer import QuickGELU

    half = any(v.dtype == torch.float16 for v in state.values())
    if half and not any(isinstance(m, QuickGELU) for m in model.modules()):
        log.warning("%s looks like OpenAI weights (fp16) but the model uses GELU: name the '-quickgelu' variant", path)


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model`; one clear line when it does not fit the architecture."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})"
        )
        raise ValueError(f"weights in {path} do not fit the named CLIP architecture: {detail}")
    _warn_if_activation_differs(model, state, Path(path))
    model.load_state_dict(state)  # copies cast fp16 files to the model's dtype


@dataclass
class TextEncoding:
    """CLIP text outputs the prior and decoder condition on."""

    embed: torch.Tensor  # (B, D) unit-norm z_t
    tokens: torch.Tensor  # (B, L, W) last-layer hidden states (after ln_final)
    mask: torch.Tensor  # (B, L) bool, True for real tokens (SOT .. EOT)


def image_input_spec(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input side, channel mean, channel std) of an open_clip model's image tower."""
    visual = model.visual
    size = visual.image_size
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return (size if isinstance(size, int) else size[0]), tuple(mean), tuple(std)


def to_clip_input(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, size, size), normalised by (mean, std) (1, 3, 1, 1).

    Shared by training (`CLIPModule`) and frozen use, so both see identical inputs.
    """
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1], unclamped: CLIP sees exactly what it is given
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x - mean) / std


class FrozenCLIP(nn.Module):
    """A CLIP model used as a fixed encoder: eval mode, no gradients, inputs in [-1, 1].

    `encode_image` resizes to the model's resolution and applies its normalisation; both
    encoders return unit-norm embeddings, as unCLIP's prior and decoder expect.
    """

    def __init__(self, model_name: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.model_name = model_name
        if pretrained:
            self.model = create_clip(model_name, pretrained)
        else:  # no weights: a fixed random init, so every construction is the same encoder
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = create_clip(model_name)
        self.model.requires_grad_(False)
        self.train(False)  # eval mode, for this wrapper and the model alike
        self.image_size, mean, std = image_input_spec(self.model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)  # always frozen

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S), normalised."""
        return to_clip_input(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)  # (B, D)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, W)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)  # (B, L, W)
        eot = tokens.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
        embed = pooled @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(pooled)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
        return TextEncoding(F.normalize(embed.float(), dim=-1), x.float(), mask)
