"""Image manipulations with the bipartite latent (z_i, x_T) (Ramesh et al. 2022 §3).

- Variations (§3.1): z_i = CLIP(image), x_T = DDIM inversion; decode with DDIM eta > 0.
- Interpolations (§3.2): slerp between two images' z_i; the decoder latent either slerps between the
  two images' DDIM inversions (the paper's first option: the row's endpoints reconstruct the inputs)
  or is one random x_T for the whole row (its second option: endpoints that need not be the inputs).
- Text diffs (§3.3): z_d = norm(z_t - z_t0); slerp from z_i towards z_d with x_T from inversion.
Images are conditioned on z_i alone (the caption input is dropped to its learned null).

DDIM inversion runs the η = 0 update backwards without clipping x̂0, so whatever decodes an inverted
x_T (reconstructions, variations, text diffs) decodes without clipping too (`INVERSE_PAIR`): with
static clipping the round trip is no longer the exact inverse wherever x̂0 leaves [-1, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.core.images import to_unit
from modules.diffusion import ddim_invert
from modules.diffusion.config import Clipping, SamplingConfig, autocast_model, noise
from modules.diffusion.schedules import space_timesteps
from modules.pipelines.unclip import GenerateConfig, UnCLIPPipeline


INVERSE_PAIR = Clipping.NONE  # the clipping of DDIM inversion, hence of every decode from its x_T
INTERPOLATION_LATENTS = ("inverted", "random")  # §3.2's two options for the decoder latent of a row


def slerp(a: Tensor, b: Tensor, theta: float | Tensor, normalize: bool = True) -> Tensor:
    """Spherical interpolation along the last dim: sin((1-t)w)/sin(w) a + sin(t w)/sin(w) b, w the angle
    between a and b. `normalize`: of unit vectors (a and b normalised first); else the weights apply to
    a and b as given (Gaussian latents, whose norms are both about sqrt(d) and stay so)."""
    unit_a, unit_b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if normalize:
        a, b = unit_a, unit_b
    cos = (unit_a * unit_b).sum(-1, keepdim=True)
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device)
    return (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / torch.sin(omega)


def to_decoder_input(pipe: UnCLIPPipeline, images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> decoder resolution in [-1, 1]."""
    size = pipe.decoder.unet.config.image_size
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).to(pipe.device)


@torch.no_grad()
def invert(pipe: UnCLIPPipeline, images: Tensor, steps: int = 50) -> tuple[Tensor, Tensor]:
    """The bipartite latent (z_i, x_T) of images in [0, 1] (DDIM eta = 0 run backwards)."""
    x0 = to_decoder_input(pipe, images)
    z_i = pipe.clip.encode_image(x0)
    diffusion = pipe.decoder.diffusion
    respaced = diffusion.respaced(space_timesteps(diffusion.num_timesteps, steps))
    unet = autocast_model(pipe.decoder.unet, pipe.decoder.sampling.precision)  # the decodes' precision
    x_T = ddim_invert(respaced, unet, x0, model_kwargs=pipe.decoder_kwargs(None, z_i), progress=False)
    return z_i, x_T


def _sampling(pipe: UnCLIPPipeline, steps: int, guidance_scale: float | None = None, **kwargs: Any) -> SamplingConfig:
    """A manipulation's decoder sampling: its own steps, eta, guidance (None: the decoder's own scale)
    and clipping, in the decoder's precision (the same as the inversion's, so the two stay an inverse pair)."""
    scale = pipe.decoder.sampling.guidance_scale if guidance_scale is None else guidance_scale
    return SamplingConfig(steps=steps, precision=pipe.decoder.sampling.precision, guidance_scale=scale, **kwargs)


def _decode(pipe: UnCLIPPipeline, z_i: Tensor, x_T: Tensor, sampling: SamplingConfig, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    kwargs = pipe.decoder_kwargs(None, z_i)
    x = pipe.decoder.generate(kwargs, sampling=sampling, generator=gen, x_T=x_T)
    for up in pipe.upsamplers:
        x = up.generate(x, generator=gen)
    return to_unit(x)


@torch.no_grad()
def reconstruction_error(pipe: UnCLIPPipeline, images: Tensor, steps: int = 50,
                         clipping: Clipping = INVERSE_PAIR) -> tuple[Tensor, float]:
    """Invert then decode with eta = 0: reconstructions at decoder size, mean |error| in [0, 1] units
    (`clipping` of the decode; the inversion never clips, so NONE is the exact inverse pair)."""
    z_i, x_T = invert(pipe, images, steps)
    sampling = _sampling(pipe, steps, eta=0.0, guidance_scale=1.0, clipping=clipping)
    rec = pipe.decoder.generate(pipe.decoder_kwargs(None, z_i), sampling=sampling, x_T=x_T)
    rec = to_unit(rec)
    target = to_unit(to_decoder_input(pipe, images))
    return rec, (rec - target).abs().mean().item()


@torch.no_grad()
def variations(pipe: UnCLIPPipeline, images: Tensor, num: int = 4, eta: float = 0.8, steps: int = 50,
               guidance_scale: float = 1.0, seed: int = 0) -> Tensor:
    """`num` variations per image, (B * num, 3, S, S) in [0, 1], image-major."""
    z_i, x_T = invert(pipe, images, steps)
    z_i, x_T = z_i.repeat_interleave(num, 0), x_T.repeat_interleave(num, 0)
    sampling = _sampling(pipe, steps, eta=eta, guidance_scale=guidance_scale, clipping=INVERSE_PAIR)
    return _decode(pipe, z_i, x_T, sampling, seed)


@torch.no_grad()
def interpolate(pipe: UnCLIPPipeline, image_a: Tensor, image_b: Tensor, num: int = 5, steps: int = 50,
                guidance_scale: float | None = None, seed: int = 0, latent: str = "inverted") -> Tensor:
    """A row of `num` images from a to b: slerp on z_i, and on the decoder latent x_T; guided on z_i
    at `guidance_scale` (None: the decoder's own scale).

    `latent="inverted"` (§3.2's first option): x_T slerps between the two images' DDIM inversions, one
    trajectory whose endpoints reconstruct a and b (at guidance 1, as closely as the inversion round trip
    does). `latent="random"` (its second option): one random x_T for the whole row; the endpoints are
    then samples of a's and b's z_i.
    """
    if latent not in INTERPOLATION_LATENTS:
        raise ValueError(f"latent must be one of {INTERPOLATION_LATENTS}, got {latent!r}")
    thetas = torch.linspace(0, 1, num, device=pipe.device)[:, None]
    pair = torch.cat([image_a[:1], image_b[:1]])
    if latent == "inverted":
        z, x_T = invert(pipe, pair, steps)
        flat = x_T.flatten(1)
        x_row = slerp(flat[:1].expand(num, -1), flat[1:].expand(num, -1), thetas, normalize=False).view(num, *x_T.shape[1:])
        clipping = INVERSE_PAIR
    else:
        z = pipe.clip.encode_image(to_decoder_input(pipe, pair))
        size = pipe.decoder.unet.config.image_size
        x_row = noise((1, 3, size, size), torch.Generator().manual_seed(seed), pipe.device).expand(num, -1, -1, -1)
        clipping = pipe.decoder.sampling.clipping
    z_row = slerp(z[:1].expand(num, -1), z[1:].expand(num, -1), thetas)
    sampling = _sampling(pipe, steps, eta=0.0, guidance_scale=guidance_scale, clipping=clipping)
    return _decode(pipe, z_row, x_row.contiguous(), sampling, seed)


@torch.no_grad()
def text_diff(pipe: UnCLIPPipeline, image: Tensor, base_caption: str, new_caption: str, num: int = 5,
              max_theta: float = 0.5, steps: int = 50, guidance_scale: float | None = None, seed: int = 0) -> Tensor:
    """Move an image towards a caption change: z_d = norm(z_t - z_t0), slerp(z_i, z_d, theta) for theta
    from 0 to `max_theta` (the paper: up to 0.5), guided on z_i at `guidance_scale` (None:
    the decoder's own scale)."""
    z_i, x_T = invert(pipe, image[:1], steps)
    texts = pipe.encode_text([base_caption, new_caption])["text_embed"]
    z_d = F.normalize(texts[1:] - texts[:1], dim=-1)
    thetas = torch.linspace(0, max_theta, num, device=z_i.device)[:, None]
    z_row = slerp(z_i.expand(num, -1), z_d.expand(num, -1), thetas)
    return _decode(pipe, z_row, x_T.expand(num, -1, -1, -1).contiguous(),
                   _sampling(pipe, steps, eta=0.0, guidance_scale=guidance_scale, clipping=INVERSE_PAIR), seed)
