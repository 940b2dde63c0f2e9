"""Images: base64 PNG/JPEG (or a data: URL), an uploaded file, or a nested array of pixels."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ocd_core.bundle import Manifest

from ..errors import InputError
from .base import Modality

MAX_PIXELS = 4096 * 4096
INLINE_PIXELS = 256 * 256  # a small PNG can still declare a huge image: those decode on a worker thread
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INFLATING_CHUNKS = {b"zTXt", b"iTXt", b"iCCP"}  # Pillow inflates these (up to 1 MB each) on reading
PNG_PLAIN_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"pHYs", b"cHRM"}  # what Pillow reads without limits
INLINE_CHUNKS = 32  # Pillow parses each chunk in Python: 1,900 tiny chunks take 5.7 ms


def png_pixels(data: bytes) -> int | None:
    """Width x height from a PNG's IHDR, read from the bytes without decoding; None for anything
    else and for a PNG whose decoding time its size does not bound: a chunk that inflates besides
    the pixels (compressed text, an ICC profile), or more than INLINE_CHUNKS chunks."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    pos, chunks = 8, 0
    while pos + 8 <= len(data):  # chunk: length (4), type (4), data, CRC (4)
        chunks += 1
        if chunks > INLINE_CHUNKS or data[pos + 4 : pos + 8] in INFLATING_CHUNKS:
            return None
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")


def png_image(data: bytes) -> Image.Image | None:
    """The common PNG (8-bit grey or RGB, not interlaced), decoded by Pillow's PNG decoder without
    ``Image.open``'s format probing and Python chunk parser: 13 instead of 24 µs for a 28x28 digit,
    on the event loop. None for anything else, for a chunk not in PNG_PLAIN_CHUNKS or whose CRC does
    not match, and for a size over MAX_PIXELS: ``Image.open`` decodes those, or says why not."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[8:16] != b"\0\0\0\rIHDR":
        return None
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    mode = "L" if color == 0 else "RGB" if color == 2 else None
    if depth != 8 or mode is None or compression or filtering or interlace or not 0 < width * height <= MAX_PIXELS:
        return None
    pos, idat, last = 8, [], b""
    while pos + 12 <= len(data):  # chunk: length (4), type (4), data, CRC of type and data (4)
        end = pos + 8 + int.from_bytes(data[pos : pos + 4], "big")
        if end + 4 > len(data) or zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return None
        kind = data[pos + 4 : pos + 8]
        if kind not in PNG_PLAIN_CHUNKS or (kind == b"IDAT" and idat and last != b"IDAT"):  # (IDATs are consecutive)
            return None
        if kind == b"IDAT":
            idat.append(data[pos + 8 : end])
        elif kind == b"IEND":
            break
        pos, last = end + 4, kind
    if not idat:
        return None
    return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode, 0)  # ValueError if it does not decode


class ImageModality(Modality):
    """Images: base64 PNG/JPEG (or a data: URL), an uploaded image file, or a nested array of
    pixel values in [0, 1] of the input shape. Images are converted to the model's channels
    (L or RGB) and resized to its height x width. Pillow decodes them; the common PNG (8-bit grey
    or RGB) goes straight to its PNG decoder (``png_image``): 51 instead of 87 µs per MNIST digit on
    the event loop, and +15-19 % batched throughput at concurrency 64 (bench/RESULTS.md)."""

    name = "image"

    def __init__(self, manifest: Manifest):
        super().__init__(manifest)
        Image.init()  # every format plugin now, not on the event loop at the first unreadable image
        # the normalisation's mean and std as (C, 1, 1) float32 arrays
        self._norm = (
            None
            if self._mean is None
            else tuple(t.numpy().astype(np.float32).reshape(-1, 1, 1) for t in (self._mean, self._std))
        )

    def check_values(self, x: torch.Tensor, field: str) -> torch.Tensor:
        x = super().check_values(x, field)
        if x.min() < 0 or x.max() > 1:
            raise InputError(field, f"pixel values must be in [0, 1], got [{x.min().item():g}, {x.max().item():g}]")
        return x

    def decode_json_inline(self, value: Any, nbytes: int) -> torch.Tensor | None:
        """Also only a PNG of at most INLINE_PIXELS pixels with no inflating chunks: a 32 KiB PNG can
        declare 16M pixels or hold text that inflates to megabytes. JPEGs go to a worker thread."""
        if nbytes > self.inline_bytes or not isinstance(value, str):
            return super().decode_json_inline(value, nbytes)
        data = self._bytes(value, "input")
        pixels = png_pixels(data)
        return None if pixels is None or pixels > INLINE_PIXELS else self._image(data, "input")

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        if isinstance(value, str):
            return self._image(self._bytes(value, field), field)
        return super().decode_json(value, field)

    @staticmethod
    def _bytes(value: str, field: str) -> bytes:
        """A base64 string or data: URL -> its bytes."""
        b64 = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(field, "a string input must be a base64-encoded PNG or JPEG image") from None

    def decode_upload(
        self, data: bytes, filename: str | None, content_type: str | None, field: str = "file"
    ) -> torch.Tensor:
        return self._image(data, field)

    def _image(self, data: bytes, field: str) -> torch.Tensor:
        """PNG/JPEG bytes -> the normalised sample (C, H, W). (numpy, not torch, after the decoding:
        a few small torch ops cost more than the 28x28 PNG's decoding on the event loop.)"""
        c, h, w = self.shape
        try:
            if (img := png_image(data)) is None:  # the common PNG without Image.open's probing (measured below)
                img = Image.open(io.BytesIO(data))
                if img.format not in ("PNG", "JPEG", "MPO"):  # MPO: the JPEG that many phone cameras write
                    raise InputError(field, f"expected a PNG or JPEG image, got {img.format}")
                if img.width * img.height > MAX_PIXELS:
                    raise InputError(field, f"image is {img.width}x{img.height}; the limit is {MAX_PIXELS} pixels", 413)
            mode = "L" if c == 1 else "RGB"
            if img.mode != mode:
                img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            pixels = img.tobytes()  # (decodes, if nothing above did)
        except Image.DecompressionBombError as e:  # Pillow refuses to open it: over twice its own pixel limit
            n = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(n.group(1))} pixels" if n else "too large"
            raise InputError(field, f"image is {size}; the limit is {MAX_PIXELS} pixels", 413) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            # (ValueError: e.g. a text chunk that inflates past Pillow's limit; SyntaxError: a broken PNG)
            raise InputError(field, "not a readable PNG or JPEG image", status=400) from None
        x = np.frombuffer(pixels, np.uint8).reshape(h, w, c).transpose(2, 0, 1).astype(np.float32)
        x /= np.float32(255)
        if self._norm is not None:
            x -= self._norm[0]
            x /= self._norm[1]
        return torch.from_numpy(x)
