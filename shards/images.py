"""Check, repair and optionally downsize one image, as it is packed.

Decisions are made from the bytes, never from the file name: a PNG named .JPEG, a CMYK JPEG
or a GIF is re-encoded to an RGB JPEG (what TensorFlow's ImageNet converter does, and what
every JPEG decoder, nvJPEG included, reads); a grayscale JPEG stays as it is (decoders
expand it to RGB). Truncated, empty or undecodable input raises `BadImage` with a reason
that goes to the manifest's quarantine list.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded grey
Image.MAX_IMAGE_PIXELS = 200_000_000  # ImageNet's largest are ~ 10k px a side; stop bombs

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERIFY_LEVELS = ("none", "header", "decode")
# Modes a JPEG may keep: 3-channel YCbCr/RGB and 1-channel grayscale.
_JPEG_KEEP_MODES = {"RGB", "L"}


class BadImage(ValueError):
    """The bytes are not a usable image; the message is the quarantine reason."""


@dataclass(frozen=True)
class Packed:
    data: bytes
    ext: str  # "jpg" or "png": the tar member's extension
    width: int | None
    height: int | None
    repaired: str | None  # None, or what was wrong: "cmyk", "png", "gif", "p", ...
    original_size: tuple[int, int] | None = None  # set when --max-side downsized it


def sniff(data: bytes) -> str:
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return "other"


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 would bloat files; 4:2:0 is what cameras and ImageNet itself use.
    img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white rather than letting convert() drop to black.
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        # PIL's message names the BytesIO's memory address, which would differ on every run.
        raise BadImage("not an image: no known image format in the bytes") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImage(f"not an image: {type(e).__name__}: {e}") from None


def _load(img: Image.Image, fmt: str, fast: bool) -> None:
    """Decode every byte of the image; raise BadImage if that fails.

    For a JPEG kept as it is, `fast` decodes at 1/8 DCT scale (PIL's draft mode): the
    entropy-coded data is still read to the end, so truncation and corrupt Huffman data
    are still caught, but the inverse DCT and colour conversion, most of the cost, are skipped.
    """
    try:
        if fast and fmt == "jpeg":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except Exception as e:
        raise BadImage(f"undecodable {fmt}: {type(e).__name__}: {e}") from None


def pack(
    data: bytes,
    *,
    verify: str = "decode",
    max_side: int | None = None,
    quality: int = 95,
    keep_png: bool = False,
) -> Packed:
    """Turn source bytes into what goes into the shard, or raise BadImage."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, not {verify!r}")
    if not data:
        raise BadImage("empty file")
    fmt = sniff(data)
    if verify == "none" and fmt == "jpeg" and max_side is None:
        return Packed(data, "jpg", None, None, None)  # trusted: not even the header is parsed

    img = _open(data)
    width, height = img.size
    kind = (img.format or fmt).lower()
    keep = (fmt == "jpeg" and img.mode in _JPEG_KEEP_MODES) or (fmt == "png" and keep_png and img.mode in ("RGB", "L"))
    too_big = max_side is not None and max(width, height) > max_side

    if keep and not too_big:
        if verify == "decode":
            _load(img, fmt, fast=True)
        return Packed(data, "jpg" if fmt == "jpeg" else "png", width, height, None)

    # Re-encode: full decode needed whatever the verify level.
    _load(img, fmt, fast=False)
    if keep:
        repaired = None
    elif fmt == "jpeg":
        repaired = img.mode.lower()  # "cmyk", "ycck" shows as cmyk in PIL, ...
    else:
        repaired = "jpeg" if kind == "jpeg" else kind  # png, gif, bmp, webp, ...
    out = img if img.mode in ("RGB", "L") and keep else _to_rgb(img)
    original = None
    if too_big:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        original = (width, height)
    if fmt == "png" and keep_png and repaired is None:
        return Packed(_encode_png(out), "png", out.width, out.height, None, original)
    return Packed(_encode_jpeg(out, quality), "jpg", out.width, out.height, repaired, original)
