"""Image helpers used across the tree: value ranges, uint8 conversion, grids, PNG files.

Networks and diffusion work in [-1, 1]; files, metrics and loggers in [0, 1] (`to_unit` /
`to_signed` convert), and PNGs in uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from modules.core.errors import UserError


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] (float32, clamped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_signed(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tile(images: Tensor, nrow: int, pad: int = 2, pad_value: float = 0.5) -> Tensor:
    """(B, 3, H, W) -> one (3, rows*(H+pad)+pad, nrow*(W+pad)+pad) image, row-major."""
    b, c, h, w = images.shape
    rows = max(1, -(-b // nrow))
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(b):
        r, k = divmod(i, nrow)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[i].cpu()
    return out


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save one (3, H, W) image in [0, 1] as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image[None])[0]).save(path)
    return path


def save_images(images: Tensor, out: Path, per_row: int) -> None:
    """images (N, 3, H, W) in [0, 1] -> out/{row:03d}_{col:02d}.png and out/grid.png (white gaps)."""
    out.mkdir(parents=True, exist_ok=True)
    for n, arr in enumerate(to_uint8(images)):
        Image.fromarray(arr).save(out / f"{n // per_row:03d}_{n % per_row:02d}.png")
    save_png(tile(images.detach().float().cpu(), per_row, pad=2, pad_value=1.0), out / "grid.png")


WHITE = (255, 255, 255)
# Modes with an alpha band; other modes may carry a tRNS `transparency` in `image.info`.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def flatten_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB as it looks on a white page.

    `image.convert("RGB")` alone gets three kinds of file wrong:
    - transparency (RGBA, LA, PA, or a palette / grayscale / RGB PNG's tRNS `transparency`) is
      dropped, showing whatever colour the transparent pixels hide (often black): it is
      composited on white instead;
    - 16-bit grayscale (`I;16*`, and `I` as older Pillow opens such PNGs) is clipped to 255, so
      every value above 255 of 65535 turns white: it is scaled to 8 bits (v / 257, rounded).
      (Pillow itself opens 16-bit RGB / RGBA PNGs as 8-bit RGB / RGBA, keeping the high byte.)
    - CMYK goes through Pillow's conversion, R = (255 - C)(255 - K) / 255 (no ICC profile).
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8), "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", image.size, WHITE)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def load_image(path: str | Path) -> Tensor:
    """(1, 3, H, W) in [0, 1] (`flatten_rgb`: transparency on white, 16-bit scaled); one clear error
    for a missing or non-image file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            arr = np.array(flatten_rgb(im), dtype="uint8")
    except (UnidentifiedImageError, OSError):
        raise UserError(f"not an image file: {p}") from None
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
