"""The unCLIP decoder U-Net: GLIDE's text-conditional ADM U-Net plus CLIP image embeddings.

Architecture: Dhariwal & Nichol 2021 (ADM) with GLIDE's attention over text tokens (Nichol et al.
2021); unCLIP §2.1 (Ramesh et al. 2022): the CLIP image embedding z_i is projected and added to
the timestep embedding, and projected into ``num_image_tokens`` extra context tokens that are
concatenated with the caption tokens every attention layer attends to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.core.errors import ConfigError
from modules.core.hparams import check_range
from modules.networks.layout import LayoutEncoder
from modules.networks.linear import Linear
from modules.networks.transformer import TransformerStack
from modules.networks.unet_blocks import (
    AttentionBlock,
    CondSequential,
    Conditioning,
    Downsample,
    Resample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)


@dataclass
class UNetConfig:
    """U-Net hyper-parameters (plain types, so LightningCLI/jsonargparse builds it from YAML).

    ``attention_resolutions`` are pixel resolutions (e.g. (32, 16, 8) for a 64 px model); the
    middle block has attention iff this tuple is non-empty. ``cross_attention_resolutions``: other
    resolutions whose blocks attend to the conditioning tokens only (no spatial self-attention;
    cheap at high resolution). ``image_embed_dim`` /
    ``text_embed_dim`` set to None switch that conditioning off. ``context_dim`` defaults to
    ``model_channels * max(channel_mult)``. GroupNorm uses gcd(num_groups, channels) groups.
    ``text_layers`` > 0 trains a caption encoder with the U-Net, as GLIDE's decoder does (Nichol
    et al. 2021; unCLIP §2.1 concatenates its outputs with the image tokens): that many
    bidirectional Transformer blocks (``context_dim // num_head_channels`` heads) over the
    projected caption tokens, so each token's encoding can see the whole caption (a frozen CLIP's
    causal token states cannot: "red" does not know which shape follows).
    ``text_vocab_size`` set: the U-Net reads the caption as token ids (``text_ids``) through its
    own token and position embeddings (GLIDE's text encoder, trained with the decoder from the
    raw tokens; unCLIP §2.1 keeps it) instead of a frozen encoder's token states, which
    ``text_embed_dim`` then must not describe (None).
    ``attention_positions``: every attention block adds a fixed 2-D sin-cos position embedding to its
    spatial tokens (``AttentionBlock``), so attention can compare where two positions are; GLIDE's
    has none (it is permutation-equivariant over positions). Parameter-free.
    ``layout_dim`` set: the U-Net also takes a layout (object boxes with their phrases' embeddings of
    this width, `modules.networks.layout`), painted into a map and added to conv_in's output.
    """

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3  # 2 * in_channels for a learned variance
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: Union[int, tuple[int, ...]] = 2  # down-path count for every level, or one per level
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    # resolutions (not in attention_resolutions) whose blocks attend to the context tokens only
    cross_attention_resolutions: tuple[int, ...] = ()
    num_head_channels: int = 64
    dropout: float = 0.0
    use_checkpoint: bool = False
    image_embed_dim: Optional[int] = None
    num_image_tokens: int = 4
    text_embed_dim: Optional[int] = None
    text_layers: int = 0  # trainable bidirectional Transformer blocks over the projected caption tokens
    text_vocab_size: Optional[int] = None  # token ids in (text_ids) instead of token encodings (text_tokens)
    text_max_length: int = 77  # positions of the id embedding (open_clip's context length)
    context_dim: Optional[int] = None
    resblock_updown: bool = False
    num_groups: int = 32
    channels_last: bool = False  # NHWC weights and activations (oneDNN's native layout on CPU)
    recompute_norms: bool = False  # recompute GroupNorm(+modulation)+SiLU in backward instead of storing
    conv_before_upsample: bool = False  # Imagen's Efficient U-Net order: up-convs at the low resolution
    attention_positions: bool = False  # 2-D sin-cos position embedding in every attention block
    layout_dim: Optional[int] = None  # phrase-embedding width of a layout map (modules/networks/layout.py)

    def __post_init__(self) -> None:
        if self.conv_before_upsample and self.resblock_updown:
            raise ValueError("conv_before_upsample reorders the Upsample block; resblock_updown has none")
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.cross_attention_resolutions = tuple(self.cross_attention_resolutions)
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(self.num_res_blocks)
            if len(self.num_res_blocks) != len(self.channel_mult):
                raise ValueError(f"num_res_blocks: {len(self.num_res_blocks)} counts for {len(self.channel_mult)} levels (channel_mult)")
        if not self.channel_mult:
            raise ValueError("channel_mult: need at least one level")
        if min(self.blocks_per_level) < 0:
            raise ValueError(f"num_res_blocks: counts must be >= 0, got {self.num_res_blocks}")
        if self.context_dim is None:
            self.context_dim = self.model_channels * max(self.channel_mult)
        self.check_sizes()

    def check_sizes(self) -> None:
        """Bound every size before any weight is allocated; the image must halve cleanly at every level."""
        for name, high in (("image_size", 4096), ("in_channels", 64), ("out_channels", 128), ("model_channels", 4096),
                           ("num_head_channels", 4096), ("num_image_tokens", 256), ("num_groups", 1024)):
            check_range("unet", name, getattr(self, name), 1, high)
        check_range("unet", "dropout", self.dropout, 0.0, 1.0)
        for name in ("image_embed_dim", "text_embed_dim", "context_dim", "layout_dim"):
            if getattr(self, name) is not None:
                check_range("unet", name, getattr(self, name), 1, 65536)
        check_range("unet", "text_layers", self.text_layers, 0, 64)
        if self.text_vocab_size is not None:
            check_range("unet", "text_vocab_size", self.text_vocab_size, 1, 1 << 24)
            check_range("unet", "text_max_length", self.text_max_length, 1, 1 << 16)
            if self.text_embed_dim is not None:
                raise ConfigError("unet.text_embed_dim: must be None when text_vocab_size is set (the U-Net embeds "
                                  "the caption's token ids itself, not another encoder's token states)")
        if self.text_layers and self.context_dim % self.num_head_channels:
            raise ConfigError(f"unet.context_dim: {self.context_dim} is not divisible by num_head_channels "
                              f"{self.num_head_channels} (the caption Transformer's heads)")
        for mult in self.channel_mult:
            check_range("unet", "channel_mult", mult, 1, 64)
        if self.attention_positions and any(self.model_channels * m % 4 for m in self.channel_mult):
            raise ConfigError(f"unet.attention_positions: the 2-D position embedding needs every level's channels "
                              f"(model_channels {self.model_channels} x channel_mult) divisible by 4")
        for count in self.blocks_per_level:
            check_range("unet", "num_res_blocks", count, 0, 64)
        levels = len(self.channel_mult)
        check_range("unet", "channel_mult (levels)", levels, 1, 12)
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"unet.image_size: {self.image_size} does not halve {levels - 1} times "
                              f"(channel_mult has {levels} levels): use a multiple of {2 ** (levels - 1)}")

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        """Down-path res blocks at each level (the up path has one more, which merges the skips).
        Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1) puts more at the low resolutions,
        where a parameter costs far fewer FLOPs than at full size; a 0 at the top level is its
        "downsample before convolution" order: the full resolution keeps only conv_in, one up-path
        res block and the output layers."""
        n = self.num_res_blocks
        return (n,) * len(self.channel_mult) if isinstance(n, int) else n

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def text_enabled(self) -> bool:
        """Caption conditioning: external token encodings (text_embed_dim) or token ids (text_vocab_size)."""
        return self.text_embed_dim is not None or self.text_vocab_size is not None

    @property
    def has_context(self) -> bool:
        return self.image_embed_dim is not None or self.text_enabled


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, L, D) over the positions where mask (B, L) is True; every row needs one."""
    total = torch.where(mask[..., None], x, 0.0).sum(1)  # (B, D); where() also blocks NaN padding
    return total / mask.sum(1, keepdim=True).to(x.dtype)


class UnclipConditioner(nn.Module):
    """Turns (z_i, caption tokens, drop masks) into the embedding bias and the attention context.

    Context layout: [image tokens (num_image_tokens), null caption token (1), caption tokens (L)].
    Classifier-free guidance: a dropped z_i is replaced by a learned null embedding; a dropped
    caption has all its tokens masked and the learned null token made visible instead (the null
    token is visible iff no caption token is). The pooled caption added to the timestep
    embedding is the masked mean of the normalised context tokens of the caption part, i.e. the
    mean of the real tokens, or the null token when there are none.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        c, emb_dim, ctx = config, config.time_embed_dim, config.context_dim
        self.num_image_tokens, self.context_dim = c.num_image_tokens, ctx
        self.image_enabled = c.image_embed_dim is not None
        self.text_enabled, self.vocab_size = c.text_enabled, c.text_vocab_size
        if self.image_enabled:
            d = c.image_embed_dim
            self.null_image = nn.Parameter(torch.randn(d) * d**-0.5)
            self.image_to_emb = Linear(d, emb_dim)
            self.image_to_tokens = Linear(d, c.num_image_tokens * ctx)
        if self.vocab_size is not None:  # GLIDE: token + position embeddings learned with the U-Net
            # CLIP's text-tower init (open_clip TextTransformer.init_parameters): tokens N(0, 0.02²), positions
            # N(0, 0.01²), so a token's position is visible beside its identity (nn.Embedding's N(0, 1) would
            # bury the positions 100:1, and with them which object a word belongs to)
            self.token_embedding = nn.Embedding(self.vocab_size, ctx)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            self.positional_embedding = nn.Parameter(torch.randn(c.text_max_length, ctx) * 0.01)
        elif self.text_enabled:
            self.text_proj = Linear(c.text_embed_dim, ctx)
        if self.text_enabled:
            self.null_text = nn.Parameter(torch.randn(ctx) * ctx**-0.5)
            self.text_to_emb = Linear(ctx, emb_dim)
            self.text_encoder = (
                TransformerStack(ctx, c.text_layers, ctx // c.num_head_channels, 4.0, 0.0, False, causal=False)
                if c.text_layers else None
            )
        self.context_norm = nn.LayerNorm(ctx) if c.has_context else None

    def forward(
        self,
        emb: Tensor,  # (B, E) timestep embedding
        image_embed: Optional[Tensor] = None,  # (B, D_img)
        text_tokens: Optional[Tensor] = None,  # (B, L, D_txt)
        text_mask: Optional[Tensor] = None,  # (B, L) bool, True = real token
        drop_image: Optional[Tensor] = None,  # (B,) bool, True = use the null embedding
        drop_text: Optional[Tensor] = None,  # (B,) bool, True = use the null caption
        text_ids: Optional[Tensor] = None,  # (B, L) int64 token ids, with text_vocab_size
    ) -> Conditioning:
        if not self.image_enabled and image_embed is not None:
            raise ValueError("image_embed given but image_embed_dim is None")
        if not self.text_enabled and (text_tokens is not None or text_ids is not None or text_mask is not None):
            raise ValueError("caption given but the U-Net has no caption conditioning (text_embed_dim and "
                             "text_vocab_size are None)")
        text_tokens = self.caption_tokens(text_tokens, text_ids)
        if self.context_norm is None:
            return Conditioning(F.silu(emb))
        B = emb.shape[0]
        parts: list[Tensor] = []
        if self.image_enabled:
            z = self.null_image.expand(B, -1) if image_embed is None else image_embed  # (B, D)
            if drop_image is not None:
                z = torch.where(drop_image[:, None], self.null_image, z)
            emb = emb + self.image_to_emb(z)
            parts.append(self.image_to_tokens(z).view(B, self.num_image_tokens, self.context_dim))
        text_mask_full = None
        if self.text_enabled:
            null = self.null_text.expand(B, 1, -1)  # (B, 1, D_ctx)
            if text_tokens is None:
                parts.append(null)
            else:
                keep = text_tokens.new_ones(text_tokens.shape[:2], dtype=torch.bool)
                keep = keep if text_mask is None else text_mask.bool()  # (B, L)
                if drop_text is not None:
                    keep = keep & ~drop_text[:, None]
                text_mask_full = torch.cat([~keep.any(1, keepdim=True), keep], 1)  # (B, 1 + L)
                tokens = text_tokens if self.vocab_size is not None else self.text_proj(text_tokens)  # (B, L, D_ctx)
                if self.text_encoder is not None:
                    tokens = self.text_encoder(tokens, keep)  # each caption token attends to the caption
                parts += [null, tokens]
        context = self.context_norm(torch.cat(parts, 1))  # (B, S, D_ctx)
        mask = None
        if self.text_enabled:
            n_img = self.num_image_tokens if self.image_enabled else 0
            text_ctx = context[:, n_img:]  # (B, 1 + L, D_ctx)
            if text_mask_full is None:
                pooled = text_ctx[:, 0]  # only the null token
            else:
                pooled = _masked_mean(text_ctx, text_mask_full)  # (B, D_ctx)
            emb = emb + self.text_to_emb(pooled)
            if text_mask_full is not None:
                mask = F.pad(text_mask_full, (n_img, 0), value=True)  # (B, S)
        return Conditioning(F.silu(emb), context, mask)

    def caption_tokens(self, text_tokens: Optional[Tensor], text_ids: Optional[Tensor]) -> Optional[Tensor]:
        """The caption as the U-Net receives it: external token encodings (B, L, D_txt), or, with
        ``text_vocab_size``, token ids (B, L) embedded here: E[id] + P[position] (B, L, D_ctx)."""
        if self.vocab_size is None:
            if text_ids is not None:
                raise ValueError("text_ids given but unet.text_vocab_size is None (this U-Net reads text_tokens)")
            return text_tokens
        if text_tokens is not None:
            raise ValueError("this U-Net embeds caption token ids (unet.text_vocab_size): pass text_ids, not text_tokens")
        if text_ids is None:
            return None
        length = text_ids.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(f"text_ids: {length} tokens, more than unet.text_max_length {self.positional_embedding.shape[0]}")
        return self.token_embedding(text_ids) + self.positional_embedding[:length]


class UNet(nn.Module):
    """GLIDE / ADM U-Net with unCLIP conditioning; predicts ε (and variance if out_channels = 2C).

    ``forward(x, t, *, image_embed, text_tokens, text_mask, drop_image, drop_text, text_ids, layout_boxes,
    layout_embeds, layout_mask, drop_layout)``:
    x (B, C, H, W) with H, W divisible by 2**(len(channel_mult) - 1); t (B,) timestep indices
    (0..999). Conditioning that is enabled but not given is treated as dropped (the learned null);
    conditioning disabled in the config must not be given (drop masks are then ignored).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.cross_attention_resolutions and not c.has_context:
            raise ConfigError("unet.cross_attention_resolutions: the U-Net has no conditioning tokens to attend to")
        mc, emb_dim = c.model_channels, c.time_embed_dim
        self.time_embed = nn.Sequential(
            Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim)
        )
        self.conditioner = UnclipConditioner(c)
        self._num_downsamples = len(c.channel_mult) - 1
        self.conv_in = nn.Conv2d(self._input_channels(), mc, 3, padding=1)
        self.layout = LayoutEncoder(c.layout_dim, mc) if c.layout_dim is not None else None
        self.input_blocks, skip_channels, ch = self._build_down()
        self.middle_block = CondSequential(
            self._res(ch, ch),
            *([self._attn(ch)] if c.attention_resolutions else []),
            self._res(ch, ch),
        )
        self.output_blocks, ch = self._build_up(ch, skip_channels)
        self.out = nn.Sequential(
            group_norm(ch, c.num_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)),
        )
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- construction
    def _input_channels(self) -> int:
        """Channels entering conv_in; subclasses that concatenate extra inputs override this."""
        return self.config.in_channels

    def _res(self, ch: int, out: int, resample: Resample = Resample.NONE) -> ResBlock:
        c = self.config
        return ResBlock(
            ch, out, c.time_embed_dim, dropout=c.dropout, num_groups=c.num_groups, resample=resample,
            recompute_norms=c.recompute_norms,
        )

    def _attn(self, ch: int, self_attention: bool = True) -> AttentionBlock:
        c = self.config
        return AttentionBlock(
            ch,
            num_head_channels=c.num_head_channels,
            num_groups=c.num_groups,
            context_dim=c.context_dim if c.has_context else None,
            self_attention=self_attention,
            positions=c.attention_positions,
        )

    def _attn_layers(self, ch: int, resolution: int) -> list[nn.Module]:
        """The attention block a res block at this pixel resolution is followed by, if any."""
        c = self.config
        if resolution in c.attention_resolutions:
            return [self._attn(ch)]
        if resolution in c.cross_attention_resolutions:
            return [self._attn(ch, self_attention=False)]
        return []

    def _build_down(self) -> tuple[nn.ModuleList, list[int], int]:
        c = self.config
        blocks, ch, ds = nn.ModuleList(), c.model_channels, 1
        skip_channels = [ch]  # conv_in's output is the first skip
        for level, (mult, n_blocks) in enumerate(zip(c.channel_mult, c.blocks_per_level)):
            for _ in range(n_blocks):
                layers: list[nn.Module] = [self._res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                layers += self._attn_layers(ch, c.image_size // ds)
                blocks.append(CondSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = self._res(ch, ch, Resample.DOWN) if c.resblock_updown else Downsample(ch)
                blocks.append(CondSequential(down))
                skip_channels.append(ch)
                ds *= 2
        return blocks, skip_channels, ch

    def _build_up(self, ch: int, skip_channels: list[int]) -> tuple[nn.ModuleList, int]:
        c = self.config
        blocks, ds = nn.ModuleList(), 2 ** (len(c.channel_mult) - 1)
        for level, (mult, n_blocks) in reversed(list(enumerate(zip(c.channel_mult, c.blocks_per_level)))):
            for i in range(n_blocks + 1):
                out = mult * c.model_channels
                layers: list[nn.Module] = [self._res(ch + skip_channels.pop(), out)]
                ch = out
                layers += self._attn_layers(ch, c.image_size // ds)
                if level and i == n_blocks:
                    up = self._res(ch, ch, Resample.UP) if c.resblock_updown else Upsample(ch, c.conv_before_upsample)
                    layers.append(up)
                    ds //= 2
                blocks.append(CondSequential(*layers))
        return blocks, ch

    # ---------------------------------------------------------------- forward
    def embed_timestep(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, 4·model_channels) embedding (before conditioning is added)."""
        sin = timestep_embedding(t, self.config.model_channels)
        return self.time_embed(sin.to(self.time_embed[0].weight.dtype))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        x: Tensor,  # (B, C_in, H, W)
        t: Tensor,  # (B,)
        *,
        image_embed: Optional[Tensor] = None,
        text_tokens: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        drop_image: Optional[Tensor] = None,
        drop_text: Optional[Tensor] = None,
        text_ids: Optional[Tensor] = None,
        layout_boxes: Optional[Tensor] = None,  # (B, K, 4) [x0, y0, x1, y1] in [0, 1]
        layout_embeds: Optional[Tensor] = None,  # (B, K, D) unit phrase embeddings
        layout_mask: Optional[Tensor] = None,  # (B, K) bool, True = a slot with an object
        drop_layout: Optional[Tensor] = None,  # (B,) bool, True = the null (empty) layout
    ) -> Tensor:
        cond = self.conditioner(
            self.embed_timestep(t), image_embed, text_tokens, text_mask, drop_image, drop_text, text_ids
        )
        return self.run_body(x, cond, self.layout_features(x, layout_boxes, layout_embeds, layout_mask, drop_layout))

    def layout_features(self, x: Tensor, boxes: Optional[Tensor], embeds: Optional[Tensor], mask: Optional[Tensor],
                        drop: Optional[Tensor]) -> Optional[Tensor]:
        """The layout map's features (B, model_channels, H, W), or None without a layout (the null)."""
        given = [v is not None for v in (boxes, embeds, mask)]
        if any(given) and self.layout is None:
            raise ValueError("layout given but unet.layout_dim is None")
        if not all(given):
            if any(given):
                raise ValueError("a layout needs layout_boxes, layout_embeds and layout_mask together")
            return None
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"a layout needs a square image, got {tuple(x.shape[-2:])}")
        return self.layout(boxes, embeds, mask.bool(), x.shape[-1], drop)

    def _call(self, block: nn.Module, h: Tensor, cond: Conditioning) -> Tensor:
        if self.config.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, cond, use_reentrant=False)
        return block(h, cond)

    def run_body(self, x: Tensor, cond: Conditioning, extra: Optional[Tensor] = None) -> Tensor:
        """The U-Net proper: x (B, C, H, W) -> (B, out_channels, H, W) given the conditioning
        (`extra`: features added to conv_in's output, e.g. the layout's)."""
        factor = 2**self._num_downsamples
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)  # (B, mc, H, W)
        if extra is not None:
            h = h + extra.to(h.dtype)
        skips = [h]
        for block in self.input_blocks:
            h = self._call(block, h, cond)
            skips.append(h)
        h = self._call(self.middle_block, h, cond)
        for block in self.output_blocks:
            h = self._call(block, torch.cat([h, skips.pop()], dim=1), cond)
        return self.out(h)  # (B, out_channels, H, W)
