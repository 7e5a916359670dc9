"""Real-world image files through `ImageTextDataModule`, in img2dataset's own shard layout.

Every decoded tensor is checked against a reference computed here from the file's pixels (numpy
arithmetic on what PIL decodes, or on the raw values written): JPEG (RGB, grayscale, CMYK),
non-square and odd sizes (3000x20, 20x3000, 17x23, 1x1), PNG RGBA / LA / palette with and
without transparency (composited on WHITE), 16-bit PNGs (grayscale, RGB, RGBA); non-ASCII and
over-long captions (CLIP's 77 tokens: truncation, EOT position, the text mask); and bad members
(truncated / empty / non-image bytes, a missing caption), which are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import shards, steps
from datamodules.image_text import ImageTextDataModule, LoaderConfig
from modules.core.images import load_image
from modules.networks.clip import FrozenCLIP

SIZE = 16  # the DataModule's image_size in these tests
LEVEL = 2 / 255  # one 8-bit level in [-1, 1]
SOT, EOT = 49406, 49407  # CLIP's start / end of text ids (the two largest in its vocabulary)
rng = np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_16bit(arr: np.ndarray) -> bytes:
    """A 16-bit RGB (H, W, 3) or RGBA (H, W, 4) PNG written by hand (Pillow cannot write them)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth colour image (JPEG keeps it well; any crop offset shows)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) * 7) % 256], -1).astype(np.uint8)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Porter-Duff `over` onto an opaque white page, in float: (H, W, 3) in 0..255."""
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


def documented_resize(arr: np.ndarray, size: int = SIZE) -> np.ndarray:
    """What `ImageTransform` documents: short side to `size` (bicubic, antialiased), centre crop."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC, reducing_gap=None))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


def signed(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) in 0..255 -> (3, H, W) in [-1, 1], float64 so the reference itself adds no error."""
    return torch.from_numpy(np.asarray(arr, dtype=np.float64)).permute(2, 0, 1) / 127.5 - 1


def decoded(data: bytes, mode: str | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert mode is None or im.mode == mode, f"PIL opened {im.mode}, the case needs {mode}"
        return np.asarray(im).copy()


# ---------------------------------------------------------------------------------------------
# Cases: (name, member extension, file bytes, reference (3, SIZE, SIZE) in [-1, 1], tolerance)
# ---------------------------------------------------------------------------------------------
def build_cases() -> list[tuple[str, str, bytes, torch.Tensor, float]]:
    cases = []

    def add(name, ext, data, ref, atol=1e-6):
        cases.append((name, ext, data, ref, atol))

    # JPEG RGB, already square: the reference is PIL's own decode (JPEG is lossy), resized as documented.
    data = encode(Image.fromarray(smooth_rgb(40, 24)), "JPEG", quality=90)
    add("jpeg_rgb_40x24", "jpg", data, signed(documented_resize(decoded(data, "RGB"))))

    # 3000 x 20 (w x h): short side 20 -> 16, long 3000 * 0.8 = 2400; centre crop x in [1192, 1208).
    wide = smooth_rgb(20, 3000)
    data = encode(Image.fromarray(wide), "JPEG", quality=95)
    full = np.asarray(Image.fromarray(decoded(data, "RGB")).resize((2400, 16), Image.BICUBIC, reducing_gap=None))
    add("jpeg_3000x20", "jpg", data, signed(full[:, 1192:1208]))
    # 20 x 3000: the same, transposed; centre crop y in [1192, 1208).
    data = encode(Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))), "JPEG", quality=95)
    full = np.asarray(Image.fromarray(decoded(data, "RGB")).resize((16, 2400), Image.BICUBIC, reducing_gap=None))
    add("jpeg_20x3000", "jpg", data, signed(full[1192:1208]))
    # 17 x 23 PNG (odd both ways): 17 -> 16, 23 * 16 / 17 = 21.6 -> 22; centre crop y in [3, 19).
    odd = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    full = np.asarray(Image.fromarray(odd).resize((16, 22), Image.BICUBIC, reducing_gap=None))
    add("png_17x23", "png", encode(Image.fromarray(odd), "PNG"), signed(full[3:19]))

    # 1 x 1: every output pixel is that one colour.
    add("png_1x1", "png", encode(Image.fromarray(np.array([[[200, 30, 90]]], np.uint8)), "PNG"),
        signed(np.broadcast_to(np.array([200, 30, 90]), (SIZE, SIZE, 3))))
    data = encode(Image.fromarray(np.array([[[10, 200, 120]]], np.uint8)), "JPEG", quality=95)
    add("jpeg_1x1", "jpg", data, signed(np.broadcast_to(decoded(data, "RGB")[0, 0], (SIZE, SIZE, 3))))

    # Grayscale JPEG: R = G = B = L.
    gray = smooth_rgb(SIZE, SIZE)[..., 0]
    data = encode(Image.fromarray(gray, "L"), "JPEG", quality=90)
    add("jpeg_gray_L", "jpg", data, signed(np.repeat(decoded(data, "L")[..., None], 3, -1)))

    # CMYK JPEG: R = 255 (1 - C/255)(1 - K/255), etc. (no ICC profile), from the decoded CMYK values.
    cmyk = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    c = decoded(data, "CMYK").astype(np.float64) / 255
    want = 255 * (1 - c[..., :3]) * (1 - c[..., 3:])
    add("jpeg_cmyk", "jpg", data, signed(want), atol=0.5 * LEVEL + 1e-6)  # the pipeline rounds to uint8

    # RGBA with every alpha 0..255; transparent pixels hide black or saturated colours, so a
    # pipeline that drops alpha shows them. Expected: over white.
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = np.arange(256, dtype=np.uint8).reshape(SIZE, SIZE)
    rgba[0, :4] = 0  # fully transparent black: must come out white
    add("png_rgba", "png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), signed(on_white(rgba[..., :3], rgba[..., 3])),
        atol=0.5 * LEVEL + 1e-6)
    # The same RGBA PNG stored under `.jpg` (img2dataset with disable_all_reencoding keeps the
    # original bytes under the encode_format's extension), at an odd size so it is resized too.
    rgba_odd = rng.integers(0, 256, (21, 19, 4), dtype=np.uint8)
    rgba_odd[..., 3] = rng.choice(np.array([0, 0, 64, 128, 255], np.uint8), (21, 19))
    flat = np.rint(on_white(rgba_odd[..., :3], rgba_odd[..., 3])).astype(np.uint8)
    add("png_rgba_as_jpg_19x21", "jpg", encode(Image.fromarray(rgba_odd, "RGBA"), "PNG"), signed(documented_resize(flat)))

    # LA: gray + alpha, over white.
    la = rng.integers(0, 256, (SIZE, SIZE, 2), dtype=np.uint8)
    la[..., 1] = np.arange(255, -1, -1, dtype=np.uint8).reshape(SIZE, SIZE)
    add("png_LA", "png", encode(Image.fromarray(la, "LA"), "PNG"),
        signed(on_white(np.repeat(la[..., :1], 3, -1), la[..., 1])), atol=0.5 * LEVEL + 1e-6)

    # Palette P: 16 colours; then with a tRNS table (per-index alpha) and with one transparent index.
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (SIZE, SIZE), dtype=np.uint8)
    index[0, :16] = np.arange(16)  # every index appears

    def p_image() -> Image.Image:
        im = Image.fromarray(index, "P")
        im.putpalette(palette.flatten().tolist())
        return im

    add("png_P", "png", encode(p_image(), "PNG"), signed(palette[index]))
    alphas = np.array([0, 255, 128, 30, 255, 0, 200, 255, 90, 255, 255, 10, 255, 160, 255, 0], np.uint8)
    data = encode(p_image(), "PNG", transparency=alphas.tobytes())
    assert decoded(data, "P") is not None
    add("png_P_trns_table", "png", data, signed(on_white(palette[index], alphas[index])), atol=0.5 * LEVEL + 1e-6)
    add("png_P_one_transparent", "png", encode(p_image(), "PNG", transparency=3),
        signed(np.where((index == 3)[..., None], 255, palette[index])))

    # 16-bit grayscale (I;16), the full range: expected v / 65535 of white (0.5 level: the rounding).
    g16 = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    g16[0, :4] = [0, 255, 256, 65535]
    data = encode(Image.fromarray(g16), "PNG")
    assert decoded(data).dtype.itemsize == 2  # stored and read back with 16 bits
    add("png_16bit_gray", "png", data, signed(np.repeat(g16[..., None], 3, -1) / 257), atol=0.5 * LEVEL + 1e-6)
    # 16-bit RGB and RGBA (Pillow keeps the high byte of each sample: within one level).
    c16 = rng.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16)
    add("png_16bit_rgb", "png", png_16bit(c16), signed(c16 / 257), atol=LEVEL + 1e-6)
    c16a = rng.integers(0, 65536, (SIZE, SIZE, 4), dtype=np.uint16)
    c16a[0, :3, 3] = 0  # fully transparent: white
    add("png_16bit_rgba", "png", png_16bit(c16a),
        signed(on_white(c16a[..., :3] / 257, c16a[..., 3] / 257)), atol=2 * LEVEL + 1e-6)
    return cases


CASES = build_cases()
CAPTIONS = {
    "ascii": "a photo of a red cube",
    "accents": "Café crème brûlée à Zürich, naïve façade",
    "japanese": "日本語のキャプション：東京の夜景",
    "emoji": "a cat 🐱 riding a rocket 🚀 👩‍🚀 ✨",
    "long": " ".join(f"word{i} and a small blue sphere" for i in range(80)),  # ~600 tokens, < 4096 bytes
}
assert len(CAPTIONS["long"].encode()) < steps.CaptionRules().max_bytes


# ---------------------------------------------------------------------------------------------
# img2dataset's layout
# ---------------------------------------------------------------------------------------------
def write_img2dataset_shard(folder: Path, shard: int, samples: list[dict]) -> Path:
    """`{shard:05d}.tar` with `{key}.jpg/.png`, `{key}.txt`, `{key}.json` (img2dataset's fields),
    `{shard:05d}_stats.json` and, when pyarrow is installed, `{shard:05d}.parquet` beside it.
    A sample dict holds key, caption (None: no .txt), image bytes (None: no image), ext."""
    path = folder / f"{shard:05d}.tar"
    rows = []
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for s in samples:
            key, image = s["key"], s.get("image")
            try:
                with Image.open(io.BytesIO(image)) as im:
                    (w, h) = im.size
            except Exception:
                w = h = None
            meta = {
                "url": f"https://example.com/images/{key}.{s['ext']}", "caption": s.get("caption"), "key": key,
                "status": "success", "error_message": None, "width": w, "height": h,
                "original_width": w, "original_height": h, "exif": json.dumps({"Image Orientation": "Horizontal (normal)"}),
                "sha256": hashlib.sha256(image or b"").hexdigest(),
            }
            rows.append(meta)
            if image is not None:
                add(f"{key}.{s['ext']}", image)
            if s.get("caption") is not None:
                add(f"{key}.txt", s["caption"].encode("utf-8"))
            add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 1.5, "start_time": 1700000000.0, "end_time": 1700000001.5, "status_dict": {"success": len(samples)}}
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the parquet beside the tar is optional here
        pass
    else:
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    return path


def datamodule(pattern: str, tokenizer: str | None = "ViT-B-32", batch_size: int = 4) -> ImageTextDataModule:
    dm = ImageTextDataModule(pattern, pattern, image_size=SIZE, tokenizer=tokenizer, val_samples=1000,
                             shuffle_buffer=0, loader=LoaderConfig(batch_size=batch_size, num_workers=0))
    dm.setup("fit")
    return dm


def read_all(loader) -> tuple[dict[str, dict], dict[str, int]]:
    """{key: {"image", "caption", "tokens"}}, summed skip counts."""
    out: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            assert key not in out
            out[key] = {"image": batch["image"][i], "caption": batch["caption"][i],
                        "tokens": batch["tokens"][i] if "tokens" in batch else None}
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return out, skipped


@pytest.fixture(scope="module")
def img2dataset_dir(tmp_path_factory) -> tuple[Path, dict[str, tuple], dict[str, str]]:
    """Two shards: the image cases (shard 0) and the caption cases (shard 1)."""
    folder = tmp_path_factory.mktemp("img2dataset")
    by_key: dict[str, tuple] = {}
    samples = []
    for i, case in enumerate(CASES):
        key = f"{0:05d}{i:04d}"
        by_key[key] = case
        samples.append({"key": key, "ext": case[1], "image": case[2], "caption": f"case {case[0]}"})
    write_img2dataset_shard(folder, 0, samples)
    caption_keys: dict[str, str] = {}
    image = encode(Image.fromarray(smooth_rgb(SIZE, SIZE)), "JPEG", quality=90)
    samples = []
    for i, (name, text) in enumerate(CAPTIONS.items()):
        key = f"{1:05d}{i:04d}"
        caption_keys[name] = key
        samples.append({"key": key, "ext": "jpg", "image": image, "caption": text})
    write_img2dataset_shard(folder, 1, samples)
    return folder, by_key, caption_keys


@pytest.fixture(scope="module")
def read_back(img2dataset_dir):
    folder, _, _ = img2dataset_dir
    dm = datamodule(str(folder / "{00000..00001}.tar"))
    return read_all(dm.val_dataloader())


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_layout_is_img2datasets_and_only_tars_are_read(img2dataset_dir, read_back):
    folder, by_key, caption_keys = img2dataset_dir
    names = sorted(p.name for p in folder.iterdir())
    assert {"00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"} <= set(names)
    with tarfile.open(folder / "00000.tar") as tar:
        members = tar.getnames()
    assert members[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    meta = json.loads(tarfile.open(folder / "00000.tar").extractfile("000000000.json").read())
    assert meta["key"] == "000000000" and meta["status"] == "success" and (meta["width"], meta["height"]) == (24, 40)
    assert shards.expand_shards(str(folder / "*.tar")) == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    out, skipped = read_back
    assert sorted(out) == sorted([*by_key, *caption_keys.values()]) and skipped == {}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_image_matches_reference(img2dataset_dir, read_back, case: str):
    _, by_key, _ = img2dataset_dir
    out, _ = read_back
    key = next(k for k, c in by_key.items() if c[0] == case)
    _, _, _, ref, atol = by_key[key]
    got = out[key]["image"]
    assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.float32
    assert out[key]["caption"] == f"case {case}"
    err = (got.double() - ref).abs()
    worst, max_err = np.unravel_index(int(err.argmax()), err.shape), float(err.max())
    assert max_err <= atol, (
        f"{case}: max |error| {max_err / LEVEL:.2f} levels at (c, y, x) = {tuple(int(i) for i in worst)}: "
        f"got {float(got[worst]) * 127.5 + 127.5:.1f}, want {float(ref[worst]) * 127.5 + 127.5:.1f}")


def test_transparent_pixels_are_white_not_what_they_hide(img2dataset_dir, read_back):
    """The RGBA case's first row starts with fully transparent black pixels."""
    _, by_key, _ = img2dataset_dir
    out, _ = read_back
    key = next(k for k, c in by_key.items() if c[0] == "png_rgba")
    torch.testing.assert_close(out[key]["image"][:, 0, :4], torch.ones(3, 4), rtol=0, atol=1e-6)
    key = next(k for k, c in by_key.items() if c[0] == "png_16bit_gray")
    # 0, 255, 256, 65535 of 65535: black, 1 level, 1 level, white (not 0, 255, 255, 255 of 255)
    levels = (out[key]["image"][0, 0, :4] + 1) * 127.5
    torch.testing.assert_close(levels, torch.tensor([0.0, 1.0, 1.0, 255.0]), rtol=0, atol=1e-4)


def token_text(tokens: torch.Tensor) -> str:
    """Token ids (no SOT / EOT / padding) back to text, whitespace removed."""
    import open_clip

    return "".join(open_clip.get_tokenizer("ViT-B-32").decode(tokens.tolist()).split())


@pytest.mark.parametrize("name", ["ascii", "accents", "japanese", "emoji"])
def test_non_ascii_captions_survive_text_and_tokens(img2dataset_dir, read_back, name: str):
    _, _, caption_keys = img2dataset_dir
    out, _ = read_back
    got = out[caption_keys[name]]
    assert got["caption"] == CAPTIONS[name]  # UTF-8 .txt read back exactly
    tokens = got["tokens"]
    assert tokens.shape == (77,) and tokens.dtype == torch.long and tokens[0] == SOT
    eot = int((tokens == EOT).nonzero().flatten()[0])
    assert (tokens == EOT).sum() == 1 and (tokens[eot + 1 :] == 0).all() and (tokens[1:eot] < SOT).all()
    # open_clip's cleaning (ftfy: full-width forms to ASCII, e.g. '：' -> ':'), lower case, split on
    # whitespace; every character (accents, kanji, kana, emoji, ZWJ sequences) is kept
    assert token_text(tokens[1:eot]) == "".join(unicodedata.normalize("NFKC", CAPTIONS[name]).lower().split())


def test_long_caption_truncated_to_77_with_eot_last(img2dataset_dir, read_back):
    _, _, caption_keys = img2dataset_dir
    out, _ = read_back
    got = out[caption_keys["long"]]
    assert got["caption"] == CAPTIONS["long"]  # the text itself is not cut
    tokens = got["tokens"]
    assert tokens.shape == (77,) and tokens[0] == SOT and tokens[76] == EOT
    assert (tokens[1:76] < SOT).all() and (tokens[1:76] != 0).all()  # 75 real tokens, no padding
    text = token_text(tokens[1:76])
    whole = "".join(CAPTIONS["long"].lower().split())
    assert whole.startswith(text) and 60 < len(text) < len(whole) // 2  # a prefix: the head is kept


def test_text_mask_covers_sot_to_eot(img2dataset_dir, read_back):
    """FrozenCLIP's mask (what prior and decoder attend over): True from SOT to EOT inclusive,
    everything for a truncated caption; the pooled embedding is read at the EOT."""
    _, _, caption_keys = img2dataset_dir
    out, _ = read_back
    names = ["ascii", "japanese", "emoji", "long"]
    tokens = torch.stack([out[caption_keys[n]]["tokens"] for n in names])
    clip = FrozenCLIP("tiny-vit")
    enc = clip.encode_text(tokens)
    assert enc.mask.shape == (4, 77) and enc.mask.dtype == torch.bool
    for row, name in enumerate(names):
        ends = (tokens[row] == EOT).nonzero().flatten().tolist()
        assert len(ends) == 1
        want = torch.zeros(77, dtype=torch.bool)
        want[: ends[0] + 1] = True
        assert torch.equal(enc.mask[row], want), name
    assert enc.mask[3].all()
    # padding after the EOT does not change the embedding (causal attention; pooled at the EOT)
    for row in range(3):
        changed = tokens[row : row + 1].clone()
        end = int((changed[0] == EOT).nonzero()[0])
        changed[0, end + 1 :] = 320  # any ordinary token id
        torch.testing.assert_close(clip.encode_text(changed).embed, enc.embed[row : row + 1], rtol=0, atol=1e-6)


def test_bad_members_are_skipped_and_counted(tmp_path: Path):
    """Broken files in an img2dataset shard: each skipped and counted once, the good ones kept."""
    good = encode(Image.fromarray(smooth_rgb(24, 24)), "JPEG", quality=90)
    good_png = encode(Image.fromarray(smooth_rgb(24, 24)), "PNG")
    bad_crc = bytearray(good_png)
    idat = bad_crc.find(b"IDAT")
    bad_crc[idat + 10] ^= 0xFF  # corrupt the compressed data
    samples = [
        {"key": "000000000", "ext": "jpg", "image": good, "caption": "good one"},
        {"key": "000000001", "ext": "jpg", "image": good[: len(good) // 2], "caption": "truncated jpeg"},
        {"key": "000000002", "ext": "jpg", "image": b"", "caption": "zero bytes"},
        {"key": "000000003", "ext": "jpg", "image": b"<html><body>404 Not Found</body></html>", "caption": "html"},
        {"key": "000000004", "ext": "jpg", "image": good, "caption": None},  # no .txt
        {"key": "000000005", "ext": "png", "image": good_png[: len(good_png) - 40], "caption": "truncated png"},
        {"key": "000000006", "ext": "png", "image": bytes(bad_crc), "caption": "corrupt png"},
        {"key": "000000007", "ext": "jpg", "image": None, "caption": "json and txt only"},
        {"key": "000000008", "ext": "jpg", "image": good, "caption": "good two"},
    ]
    write_img2dataset_shard(tmp_path, 0, samples)
    # training drops an incomplete last batch: batch 3 is read by the validation loader only
    for batch_size, train in ((1, True), (1, False), (3, False)):
        dm = datamodule(str(tmp_path / "00000.tar"), tokenizer=None, batch_size=batch_size)
        for loader in [dm.train_dataloader() if train else dm.val_dataloader()]:
            out, skipped = read_all(loader)
            assert sorted(out) == ["000000000", "000000008"]
            assert skipped == {"bad_image": 5, "missing_caption": 1, "missing_image": 1}
            want = signed(documented_resize(decoded(good, "RGB")))
            torch.testing.assert_close(out["000000000"]["image"].double(), want, rtol=0, atol=1e-6)


def test_load_image_flattens_like_the_pipeline(tmp_path: Path):
    """`load_image` (the CLI's input images) flattens alpha and 16 bits the same way: on white."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, [[0, 128, 255], [255, 64, 0]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    want = on_white(rgba[..., :3], rgba[..., 3]) / 255
    torch.testing.assert_close(load_image(tmp_path / "a.png")[0].double(), torch.from_numpy(want).permute(2, 0, 1),
                               rtol=0, atol=0.5 / 255 + 1e-6)
    Image.fromarray(np.array([[0, 1000, 40000, 65535]], np.uint16)).save(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png")[0, 0, 0] * 255
    torch.testing.assert_close(got, torch.tensor([0.0, 4.0, 156.0, 255.0]), rtol=0, atol=1e-4)  # round(v / 257)
