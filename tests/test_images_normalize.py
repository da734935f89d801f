"""Pixel normalization at build (shards/images.py): every reader sees the same pixels.

One test per rule (EXIF orientation, 16-bit, alpha, the pixel limit), each checking that
the stored image is 8-bit RGB or L and that json width/height describe it; then every
repaired image decoded by DALI (CPU) and by torchvision: same shape, pixels within JPEG rounding.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.images import BadImage, pack
from shards.types import DEFAULT_MAX_PIXELS

PHOTO = sorted((Path(__file__).parent / "data" / "photos").glob("*.JPEG"))[0]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _stored(packed) -> Image.Image:
    img = Image.open(io.BytesIO(packed.data))
    assert img.mode in ("RGB", "L"), img.mode  # every stored image: 8-bit RGB or L
    assert (packed.width, packed.height) == img.size  # json width/height describe the stored image
    assert img.getexif().get(0x0112) is None  # no orientation left for a reader to apply (or not)
    return img


def _oriented_photo() -> tuple[bytes, Image.Image]:
    """A real photo, stored sideways with Orientation=6 as phones do; returns (bytes, upright pixels)."""
    upright = Image.open(PHOTO).convert("RGB")
    upright = upright.resize((upright.width // 2, upright.height // 2))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(sideways, "JPEG", quality=95, exif=exif), upright


def _gray16(value: int) -> bytes:
    return _encode(Image.fromarray(np.full((30, 40), value, dtype=np.uint16)), "PNG")


def _png(w: int, h: int, depth: int, raw: bytes) -> bytes:
    """An RGB PNG written chunk by chunk: any bit depth, and any size claimed in its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb48() -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    row = b"\x00" + struct.pack(">HHH", 40000, 20000, 65535) * 8
    return _png(8, 4, 16, row * 4)


def _rgba() -> bytes:
    img = Image.new("RGBA", (16, 8), (200, 0, 0, 255))
    img.paste((0, 0, 255, 0), (8, 0, 16, 8))  # right half fully transparent (blue underneath)
    return _encode(img, "PNG")


def test_exif_orientation_is_applied_and_the_tag_dropped():
    data, upright = _oriented_photo()
    packed = pack(data)
    assert packed.repaired == "exif-orientation"
    img = _stored(packed)
    assert img.size == upright.size  # upright: as DALI showed it, and now as torchvision shows it too
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert diff.mean() < 3  # the same picture, the right way up, after two JPEG encodings


def test_sixteen_bit_images_are_scaled_not_clipped():
    packed = pack(_gray16(40000))
    img = _stored(packed)
    assert img.mode == "L" and "16-bit" in packed.repaired
    assert abs(np.asarray(img).astype(int).mean() - 40000 * 255 / 65535) < 1.5  # about 156, not 255
    rgb = _stored(pack(_rgb48()))
    assert np.abs(np.asarray(rgb)[1, 1].astype(int) - [156, 78, 255]).max() <= 3


def test_alpha_is_composited_on_white():
    packed = pack(_rgba())
    img = _stored(packed)
    assert img.mode == "RGB" and packed.repaired == "png"
    a = np.asarray(img).astype(int)
    assert np.abs(a[4, 2] - [200, 0, 0]).max() <= 8  # opaque pixels keep their colour
    assert np.abs(a[4, 13] - [255, 255, 255]).max() <= 8  # transparent ones are white, not blue or black


def test_images_over_the_pixel_limit_are_quarantined_before_decoding():
    # A header claiming 12000 x 12000 (144 MP) with no pixel data: refused from the header alone.
    bomb = _png(12000, 12000, 8, b"\x00")
    with pytest.raises(BadImage, match=r"too many pixels: 12000x12000 = 144,000,000 is over the limit of 89,478,485"):
        pack(bomb)
    assert DEFAULT_MAX_PIXELS == 89_478_485  # PIL's MAX_IMAGE_PIXELS
    small = _encode(Image.new("RGB", (100, 60)), "JPEG")
    with pytest.raises(BadImage, match="over the limit of 5,000 \\(--max-pixels\\)"):
        pack(small, max_pixels=5000)
    assert pack(small, max_pixels=6000).data == small  # at the limit: kept as it is


def _repaired_images() -> dict[str, bytes]:
    cmyk = _encode(Image.open(PHOTO).convert("CMYK"), "JPEG", quality=95)
    palette = _encode(Image.open(PHOTO).convert("P"), "PNG")
    out = {"exif": _oriented_photo()[0], "gray16": _gray16(40000), "rgb48": _rgb48(), "rgba": _rgba()}
    return out | {"cmyk": cmyk, "palette": palette}


def test_dali_and_torchvision_decode_every_repaired_image_alike():
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    import torch
    from nvidia.dali import pipeline_def
    from torchvision.io import ImageReadMode, decode_image

    packed = {name: pack(data) for name, data in _repaired_images().items()}
    assert all(p.repaired for p in packed.values())
    encoded = [np.frombuffer(p.data, dtype=np.uint8) for p in packed.values()]

    @pipeline_def(batch_size=len(encoded), num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(
            fn.external_source(source=lambda: encoded, batch=True), device="cpu", output_type=types.RGB
        )

    pipe = decode()
    pipe.build()
    (dali,) = pipe.run()
    for i, (name, p) in enumerate(packed.items()):
        d = np.asarray(dali.at(i)).astype(int)
        t = decode_image(torch.frombuffer(bytearray(p.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        t = t.permute(1, 2, 0).numpy().astype(int)
        assert d.shape == t.shape == (p.height, p.width, 3), name
        assert np.abs(d - t).max() <= 4 and np.abs(d - t).mean() < 0.5, name  # JPEG rounding only
