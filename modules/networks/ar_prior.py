"""The unCLIP autoregressive prior: PCA + quantisation of z_i, and a causal Transformer over codes.

Ramesh et al. 2022 §2.2 (AR prior): z_i is reduced by PCA (1024 -> 319 dims kept > 99% of the
variance), coordinates ordered by decreasing eigenvalue, each quantised into 1024 buckets; a
Transformer with a causal mask predicts the code sequence given the caption and z_t as a prefix,
plus a token for the quantised dot product z_i · z_t, so sampling can ask for a high similarity
("we sample with the dot product from the top half of the distribution").

Quantisation here is by quantiles: coordinate k's bucket edges are its training quantiles at
j/K (j = 1..K−1), so every bucket holds ≈ 1/K of the training data, and a code decodes to the
mean of the training values in its bucket. The similarity token uses the same quantile buckets over the training
z_i · z_t, so "top half" is exactly buckets ≥ S/2.

Sequence (N = L + 2 + n), output at position L+1+j predicts code j::

    [caption tokens (L, padding masked), z_t, similarity, code_0, ..., code_{n−1}]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.core.hparams import check_ranges
from modules.networks.linear import Linear
from modules.networks.prior_transformer import TRANSFORMER_RANGES, CaptionPrefix
from modules.networks.transformer import TransformerStack


@dataclass
class ARPriorConfig:
    """AR prior size; ``embed_dim`` / ``text_width`` come from the CLIP model name."""

    embed_dim: int = 1024  # D
    text_width: int = 1024  # W
    num_components: int = 319  # P: PCA dimensions kept
    num_buckets: int = 1024  # K: quantisation levels per coordinate
    similarity_buckets: int = 64  # S: levels of the z_i · z_t token
    width: int = 2048
    depth: int = 20
    heads: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_text_len: int = 77
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        check_ranges("prior", self, {**TRANSFORMER_RANGES, "num_buckets": (2, 65536), "similarity_buckets": (1, 65536)})
        if not 1 <= self.num_components <= self.embed_dim:
            raise ValueError(f"num_components must be in [1, {self.embed_dim}], got {self.num_components}")


def quantile_rows(values: Tensor, fractions: Tensor) -> Tensor:
    """Per column of values (N, P), the order statistics at `fractions` (Q,) -> (P, Q).

    Sort-based (nearest rank), so it works for any N (torch.quantile is limited to 16M inputs).
    """
    ordered = values.sort(dim=0).values  # (N, P)
    idx = (fractions * (values.shape[0] - 1)).round().long().clamp(0, values.shape[0] - 1)  # (Q,)
    return ordered[idx].T.contiguous()  # (P, Q)


def bucket_means(values: Tensor, edges: Tensor, fallback: Tensor) -> Tensor:
    """Mean of each column's values (N, P) inside each bucket of `edges` (P, K−1) -> (P, K).

    The conditional mean is the squared-error-optimal decode of a bucket (a Lloyd step); buckets
    with no training value take `fallback` (P, K).
    """
    codes = torch.searchsorted(edges, values.T.contiguous())  # (P, N)
    sums = torch.zeros_like(fallback).scatter_add_(1, codes, values.T.to(fallback))
    counts = torch.zeros_like(fallback).scatter_add_(1, codes, torch.ones_like(codes, dtype=fallback.dtype))
    return torch.where(counts > 0, sums / counts.clamp(min=1), fallback)


class PCAQuantizer(nn.Module):
    """PCA of image embeddings and per-coordinate quantile quantisation (all state in buffers).

    ``fit`` computes everything from training embeddings; ``encode`` maps z_i (B, D) to codes
    (B, P) in [0, K); ``decode`` maps codes back to a unit-norm embedding.
    """

    def __init__(self, embed_dim: int, num_components: int, num_buckets: int, similarity_buckets: int) -> None:
        super().__init__()
        d, p, k, s = embed_dim, num_components, num_buckets, similarity_buckets
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(p, d))  # rows: principal axes, by eigenvalue
        self.register_buffer("eigenvalues", torch.zeros(p))
        self.register_buffer("variance_kept", torch.zeros(()))  # fraction of total variance in P dims
        self.register_buffer("edges", torch.zeros(p, k - 1))
        self.register_buffer("centers", torch.zeros(p, k))
        self.register_buffer("similarity_edges", torch.zeros(s - 1))
        self.register_buffer("fitted", torch.zeros(()))  # float flag (EMA averages buffers)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted > 0.5)

    @torch.no_grad()
    def fit(self, image_embed: Tensor, text_embed: Tensor) -> None:
        """Fit PCA (eigendecomposition of the covariance, float64) and quantile buckets on (N, D)."""
        x = image_embed.double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)  # (D, D)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp(min=0.0), evecs.flip(1)
        p = self.components.shape[0]
        axes = evecs[:, :p].T  # (P, D)
        axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # deterministic sign
        k = self.centers.shape[1]
        coords = (x - mean) @ axes.T  # (N, P)
        frac = torch.arange(1, k, dtype=torch.float64) / k
        mids = (torch.arange(k, dtype=torch.float64) + 0.5) / k  # fallback centres of empty buckets
        sims = (image_embed.double() * text_embed.double()).sum(-1, keepdim=True)  # (N, 1)
        s = self.similarity_edges.shape[0] + 1
        dev = self.mean.device
        self.mean.copy_(mean.to(dev))
        self.components.copy_(axes.to(dev))
        self.eigenvalues.copy_(evals[:p].to(dev))
        self.variance_kept.copy_((evals[:p].sum() / evals.sum().clamp(min=1e-30)).to(dev))
        edges = quantile_rows(coords, frac)  # (P, K-1)
        self.edges.copy_(edges.to(dev))
        self.centers.copy_(bucket_means(coords, edges, quantile_rows(coords, mids)).to(dev))
        self.similarity_edges.copy_(quantile_rows(sims, torch.arange(1, s, dtype=torch.float64) / s)[0].to(dev))
        self.fitted.fill_(1.0)

    def project(self, z: Tensor) -> Tensor:
        """PCA coordinates (B, P) of embeddings (B, D)."""
        return (z.to(self.mean) - self.mean) @ self.components.T

    def encode(self, z: Tensor) -> Tensor:
        """Codes (B, P) long in [0, K): bucket index of each PCA coordinate."""
        coords = self.project(z).T.contiguous()  # (P, B)
        return torch.searchsorted(self.edges, coords).T  # (B, P)

    def decode(self, codes: Tensor) -> Tensor:
        """Unit-norm embeddings (B, D) from codes (B, P): bucket centres, inverse PCA, normalise."""
        coords = self.centers.gather(1, codes.T).T  # (B, P)
        return F.normalize(coords @ self.components + self.mean, dim=-1)

    def encode_similarity(self, image_embed: Tensor, text_embed: Tensor) -> Tensor:
        """Quantised z_i · z_t (B,) long in [0, S)."""
        sims = (image_embed * text_embed).sum(-1).to(self.similarity_edges).contiguous()
        return torch.searchsorted(self.similarity_edges, sims)


class ARPriorTransformer(nn.Module):
    """Causal Transformer over [caption, z_t, similarity, codes]; logits for the next code."""

    def __init__(self, config: ARPriorConfig) -> None:
        super().__init__()
        c = self.config = config
        self.prefix = CaptionPrefix(c.text_width, c.embed_dim, c.width, c.max_text_len)
        self.similarity = nn.Embedding(c.similarity_buckets, c.width)
        self.codes = nn.Embedding(c.num_buckets, c.width)
        self.code_pos = nn.Parameter(torch.randn(c.num_components, c.width) * 0.02)  # which PCA coordinate
        self.roles = nn.Parameter(torch.randn(2, c.width) * 0.02)  # [z_t, similarity]
        self.transformer = TransformerStack(c.width, c.depth, c.heads, c.mlp_ratio, c.dropout, c.use_checkpoint)
        self.head = Linear(c.width, c.num_buckets)
        nn.init.normal_(self.codes.weight, std=0.02)
        nn.init.normal_(self.similarity.weight, std=0.02)

    def forward(
        self,
        codes: Tensor,  # (B, n) the first n codes, 0 <= n < P
        similarity: Tensor,  # (B,) quantised z_i · z_t
        *,
        text_embed: Tensor,  # (B, D)
        text_tokens: Tensor,  # (B, L, W)
        text_mask: Tensor,  # (B, L) bool
        drop_text: Tensor | None = None,  # (B,) bool: caption and z_t replaced by the learned null
    ) -> Tensor:
        """Logits (B, n + 1, K): row j is the distribution of code j given everything before it."""
        b, n = codes.shape
        drop = drop_text if drop_text is not None else torch.zeros(b, dtype=torch.bool, device=codes.device)
        tokens, valid, zt = self.prefix(text_embed, text_tokens, text_mask, drop)
        head = torch.stack([zt, self.similarity(similarity)], dim=1) + self.roles  # (B, 2, w)
        body = self.codes(codes) + self.code_pos[:n]  # (B, n, w)
        h = torch.cat([tokens, head, body], dim=1)  # (B, L + 2 + n, w)
        key_valid = torch.cat([valid, torch.ones(b, 2 + n, dtype=torch.bool, device=codes.device)], dim=1)
        h = self.transformer(h, key_valid)
        return self.head(h[:, tokens.shape[1] + 1 :])  # (B, n + 1, K)

    @torch.no_grad()
    def sample(
        self,
        similarity: Tensor,
        *,
        text_embed: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes (B, P) drawn one coordinate at a time (no KV cache: P full forward passes), from
        `guided_logits` at `guidance_scale`."""
        b = similarity.shape[0]
        codes = torch.zeros(b, 0, dtype=torch.long, device=similarity.device)
        for _ in range(self.config.num_components):
            logits = self.guided_logits(codes, similarity, guidance_scale, text_embed=text_embed, text_tokens=text_tokens,
                                        text_mask=text_mask)
            codes = torch.cat([codes, sample_categorical(logits, temperature, generator)[:, None]], dim=1)
        return codes

    def guided_logits(self, codes: Tensor, similarity: Tensor, guidance_scale: float, **text: Tensor) -> Tensor:
        """Next-code logits (B, K) with classifier-free guidance in logit space (as for GLIDE's
        diffusion ε, applied to an autoregressive model's logits): l_∅ + s (l_c − l_∅), the
        unconditional row seeing the learned null instead of the caption and z_t. s = 1 is the
        conditional model itself (one forward pass)."""
        if guidance_scale == 1.0:
            return self(codes, similarity, **text)[:, -1]
        b = codes.shape[0]
        drop = torch.arange(2 * b, device=codes.device) >= b  # [conditional rows; unconditional rows]
        both = {k: torch.cat([v, v]) for k, v in text.items()}
        logits = self(torch.cat([codes, codes]), torch.cat([similarity, similarity]), drop_text=drop, **both)[:, -1]
        cond, uncond = logits[:b], logits[b:]
        return uncond + guidance_scale * (cond - uncond)


def sample_categorical(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One draw per row of softmax(logits / T) by inverse CDF; uniforms from the generator's device."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, K)
    gen_device = generator.device if generator is not None else logits.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=gen_device).to(probs.device)
    return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)  # (B,)
