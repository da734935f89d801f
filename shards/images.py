"""Check, repair, normalize and optionally downsize one image, as it is packed.

Decisions are made from the bytes, never from the file name. Every image stored is 8-bit RGB
or 8-bit greyscale (L), upright, with no EXIF orientation left to apply, so every reader
(DALI, nvJPEG, torchvision, PIL) decodes the same pixels, and the sample's json width and
height describe exactly what is stored. The rules, applied once at build:

- a PNG named .JPEG, a CMYK JPEG, a GIF, a palette or a 1-bit image is re-encoded as an RGB
  (or L) JPEG (what TensorFlow's ImageNet converter does); repaired: "png", "cmyk", ...
- EXIF orientation 2..8 is applied to the pixels and the tag dropped; repaired:
  "exif-orientation" (DALI applies the tag and torchvision does not, so it must not remain);
- 16-bit and other high-bit-depth images are scaled to 8 bits (value * 255 / 65535,
  rounded), not clipped; repaired: "16-bit";
- alpha: the image is composited over opaque white and the alpha channel dropped (RGBA,
  LA, transparent palettes); repaired: "rgba", "la", "p", ...;
- more than `max_pixels` pixels (default: PIL's MAX_IMAGE_PIXELS, 89,478,485): quarantined,
  read from the header before anything is decoded, so a decompression bomb costs nothing.
- a grayscale JPEG stays as it is (decoders expand it to RGB).

Several repairs at once are joined with "+" (e.g. "cmyk+exif-orientation"). With verify
"none" a JPEG is trusted and stored unparsed, so these rules need "header" or "decode".
Truncated, empty or undecodable input raises `BadImage` with a reason that goes to the
manifest's quarantine list.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps

from shards.types import DEFAULT_MAX_PIXELS, Options

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded grey
# The limit is checked here, per call, against `max_pixels`; PIL's global check would refuse
# a larger --max-pixels, so it is lifted (it would only warn below twice its value anyway).
Image.MAX_IMAGE_PIXELS = None

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERIFY_LEVELS = ("none", "header", "decode")
STORED_MODES = {"RGB", "L"}  # what every stored image is: 8-bit RGB or 8-bit greyscale
EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


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


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """The alpha rule: composite over opaque white, drop the alpha channel."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int) greyscale scaled to 0..255, rounded; float taken as 0..1 when it fits."""
    if img.mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 if lo >= 0.0 and hi <= 1.0 else 255.0 / 65535.0
    else:
        img, scale = img.convert("I"), 255.0 / 65535.0
    return img.point(lambda v: v * scale + 0.5).convert("L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _to_stored_mode(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_DEPTH:
        return _to_8bit(img)
    if _has_alpha(img):
        return _flatten_alpha(img)
    if img.mode == "1":
        return img.convert("L")
    return img if img.mode in STORED_MODES else img.convert("RGB")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: nothing a reader could apply either
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        # PIL's message names the BytesIO's memory address, which would differ on every run.
        raise BadImage("not an image: no known image format in the bytes") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImage(f"not an image: {type(e).__name__}: {e}") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(
            f"too many pixels: {width}x{height} = {width * height:,} is over the limit of {max_pixels:,} (--max-pixels)"
        )
    return img


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


def _repairs(img: Image.Image, fmt: str, kind: str, keep_png: bool, orientation: int) -> str | None:
    """What re-encoding fixes, for the sample's json "repaired" (None: nothing was wrong)."""
    container_ok = fmt == "jpeg" or (fmt == "png" and keep_png)
    reasons = [] if container_ok else ["jpeg" if kind == "jpeg" else kind]  # png, gif, bmp, webp, ...
    if img.mode in _HIGH_DEPTH:
        reasons.append("16-bit")
    elif container_ok and img.mode not in STORED_MODES:
        reasons.append(img.mode.lower())  # "cmyk" (YCCK shows as CMYK in PIL), "rgba", "p", ...
    if orientation != 1:
        reasons.append("exif-orientation")
    return "+".join(reasons) or None


def pack(
    data: bytes,
    *,
    verify: str = Options.verify,
    max_side: int | None = None,
    quality: int = Options.jpeg_quality,
    keep_png: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Packed:
    """Turn source bytes into what goes into the shard, or raise BadImage."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, not {verify!r}")
    if not data:
        raise BadImage("empty file")
    fmt = sniff(data)
    if verify == "none" and fmt == "jpeg" and max_side is None:
        return Packed(data, "jpg", None, None, None)  # trusted: not even the header is parsed

    img = _open(data, max_pixels)
    width, height = img.size
    kind = (img.format or fmt).lower()
    orientation = _orientation(img)
    stored_as_is = img.mode in STORED_MODES and orientation == 1
    keep = stored_as_is and (fmt == "jpeg" or (fmt == "png" and keep_png))
    too_big = max_side is not None and max(width, height) > max_side

    if keep and not too_big:
        if verify == "decode":
            _load(img, fmt, fast=True)
        return Packed(data, "jpg" if fmt == "jpeg" else "png", width, height, None)

    # Re-encode: full decode needed whatever the verify level.
    _load(img, fmt, fast=False)
    repaired = _repairs(img, fmt, kind, keep_png, orientation)
    out = _to_stored_mode(ImageOps.exif_transpose(img) if orientation != 1 else img)
    original = None
    if too_big:
        scale = max_side / max(out.width, out.height)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        original = (width, height)
    if fmt == "png" and keep_png:
        return Packed(_encode_png(out), "png", out.width, out.height, repaired, original)
    return Packed(_encode_jpeg(out, quality), "jpg", out.width, out.height, repaired, original)
