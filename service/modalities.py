"""One modality interface: decode a request into model-space tensors, encode predictions back.

The batcher and the engine see only tensors; everything modality-specific lives here.
A modality decodes (JSON value | uploaded file | Open Inference Protocol tensors) into one
sample tensor of the manifest's input shape, normalised as in training. Output encoding
depends on the task (classification / regression), shared by all modalities.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import zlib
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ocd_core.bundle import Manifest
from ocd_core.predictor import SamplePrediction


class InputError(Exception):
    """A client's mistake: becomes a 4xx answer naming the field and the reason."""

    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status


V2_NUMERIC = {"FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class Modality:
    """Base: numeric tensors of the input shape (JSON arrays, v2 FP32 tensors) + task encoding."""

    name: ClassVar[str] = "tensor"
    # JSON bodies up to this size decode on the event loop: for a small input the hop to a worker
    # thread costs more than the decoding (MNIST PNG: 60 µs to decode; batched throughput 886 -> 1,186 req/s)
    inline_bytes: ClassVar[int] = 32 * 1024

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.shape = tuple(manifest.input.shape)
        norm = manifest.input.normalization
        self._mean = torch.tensor(norm.mean) if norm else None
        self._std = torch.tensor(norm.std) if norm else None

    # -- decoding ---------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw sample (*shape) -> model space, with the normalisation fitted at training."""
        if self._mean is None:
            return x
        view = (-1,) + (1,) * (x.ndim - 1) if len(self._mean) > 1 else ()
        return (x - self._mean.view(view)) / self._std.view(view) if view else (x - self._mean) / self._std

    def decode_json_inline(self, value: Any, nbytes: int) -> torch.Tensor | None:
        """``decode_json(value)`` right away when that is cheap (``value`` came in a JSON body of
        ``nbytes``, at most ``inline_bytes``), else None: decode it on a worker thread."""
        return self.decode_json(value) if nbytes <= self.inline_bytes else None

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        """A JSON value -> one sample (*shape) in model space."""
        return self.normalise(self.check_array(value, field))

    def decode_upload(
        self, data: bytes, filename: str | None, content_type: str | None, field: str = "file"
    ) -> torch.Tensor:
        raise InputError(field, f"file uploads are not supported for {self.name} models")

    def check_array(self, value: Any, field: str) -> torch.Tensor:
        """A nested list of numbers of the input shape (or its shape without a leading 1) -> tensor."""
        if not isinstance(value, list):
            raise InputError(field, f"expected a nested array of shape {list(self.shape)}, got {type(value).__name__}")
        try:
            x = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise InputError(
                field, f"expected a rectangular nested array of numbers of shape {list(self.shape)}"
            ) from None
        if tuple(x.shape) != self.shape and not (self.shape[0] == 1 and tuple(x.shape) == self.shape[1:]):
            raise InputError(field, f"expected shape {list(self.shape)}, got {list(x.shape)}")
        return self.check_values(x.reshape(self.shape).float(), field)

    def check_values(self, x: torch.Tensor, field: str) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise InputError(field, "values must be finite numbers (no NaN or infinity)")
        return x

    def v2_inputs(self) -> list[dict[str, Any]]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, *self.shape]}]

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Open Inference Protocol request tensors -> a list of samples in model space."""
        by_name = {t["name"]: t for t in inputs}
        if "input" not in by_name:
            raise InputError("inputs", f"expected an input named 'input', got {sorted(by_name)}")
        t = by_name["input"]
        field = "inputs[input]"
        if t["datatype"] not in V2_NUMERIC:
            raise InputError(f"{field}.datatype", f"expected FP32 (or another numeric type), got {t['datatype']}")
        shape = list(t["shape"])
        if len(shape) != len(self.shape) + 1 or tuple(shape[1:]) != self.shape or shape[0] < 1:
            raise InputError(f"{field}.shape", f"expected [N, {', '.join(map(str, self.shape))}], got {shape}")
        data = t["data"]
        flat = _flatten(data)
        if len(flat) != math.prod(shape):
            raise InputError(f"{field}.data", f"holds {len(flat)} values, shape {shape} needs {math.prod(shape)}")
        try:
            x = torch.tensor(flat, dtype=torch.float64).float().view(shape)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise InputError(f"{field}.data", "expected numbers") from None
        x = self.check_values(x, f"{field}.data")
        return [self.normalise(s) for s in x]

    # -- encoding ---------------------------------------------------------------------
    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        """One request's prediction -> response fields (label/probabilities or value, uncertainty)."""
        if self.manifest.task == "classification":
            labels = self.manifest.labels or [str(i) for i in range(p.mean.shape[-1])]
            probs = p.mean.tolist()  # (in Python: a torch argmax costs more than the list's max here)
            out: dict[str, Any] = {"label": labels[probs.index(max(probs))], "probabilities": dict(zip(labels, probs))}
        else:
            out = {"value": p.mean.tolist()}
        out["uncertainty"] = p.uncertainty.tolist() if return_uncertainty else None
        return out

    def v2_outputs(self) -> list[dict[str, Any]]:
        if self.manifest.task == "classification":
            n = len(self.manifest.labels or [])
            return [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "uncertainty", "datatype": "FP32", "shape": [-1]},
            ]
        return [
            {"name": "value", "datatype": "FP32", "shape": [-1, *self.manifest.input.options.get("out_shape", [1])]},
            {
                "name": "uncertainty",
                "datatype": "FP32",
                "shape": [-1, *self.manifest.input.options.get("out_shape", [1])],
            },
        ]

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        n = len(preds)
        if self.manifest.task == "classification":
            labels = self.manifest.labels or [str(i) for i in range(preds[0].mean.shape[-1])]
            probs = torch.stack([p.mean for p in preds])
            return [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": probs.flatten().tolist(),
                },
                {"name": "label", "datatype": "BYTES", "shape": [n], "data": [labels[int(i)] for i in probs.argmax(1)]},
                {
                    "name": "uncertainty",
                    "datatype": "FP32",
                    "shape": [n],
                    "data": [float(p.uncertainty) for p in preds],
                },
            ]
        vals = torch.stack([p.mean for p in preds])
        unc = torch.stack([p.uncertainty for p in preds])
        return [
            {"name": "value", "datatype": "FP32", "shape": list(vals.shape), "data": vals.flatten().tolist()},
            {"name": "uncertainty", "datatype": "FP32", "shape": list(unc.shape), "data": unc.flatten().tolist()},
        ]


def _flatten(data: Any) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [v for row in data for v in _flatten(row)]
    return data if isinstance(data, list) else [data]


MAX_PIXELS = 4096 * 4096
INLINE_PIXELS = 256 * 256  # a small PNG can still declare a huge image: those decode on a worker thread
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INFLATING_CHUNKS = {b"zTXt", b"iTXt", b"iCCP"}  # Pillow inflates these (up to 1 MB each) on reading
PNG_PLAIN_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"pHYs", b"cHRM"}  # what Pillow reads without limits
INLINE_CHUNKS = 32  # Pillow parses each chunk in Python: 1,900 tiny chunks take 5.7 ms


def png_pixels(data: bytes) -> int | None:
    """Width x height from a PNG's IHDR, read from the bytes; None for anything else and for a PNG
    whose decoding time its size does not bound: a chunk that inflates besides the pixels
    (compressed text, an ICC profile), or more than INLINE_CHUNKS chunks."""
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
    (L or RGB) and resized to its height x width."""

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
            if (img := png_image(data)) is None:
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
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            # (ValueError: e.g. a text chunk that inflates past Pillow's limit; SyntaxError: a broken PNG)
            raise InputError(field, "not a readable PNG or JPEG image", status=400) from None
        x = np.frombuffer(pixels, np.uint8).reshape(h, w, c).transpose(2, 0, 1).astype(np.float32)
        x /= np.float32(255)
        if self._norm is not None:
            x -= self._norm[0]
            x /= self._norm[1]
        return torch.from_numpy(x)


class TabularModality(Modality):
    """A row of named fields: {"carat": 0.3, "cut": "Ideal", ...}, encoded with the preprocessing
    fitted at training (stored in the manifest). v2: one named input per field, N rows each."""

    name = "tabular"

    def __init__(self, manifest: Manifest):
        super().__init__(manifest)
        from ocd_core.preprocess import TabularSpec

        self.spec = TabularSpec.model_validate(manifest.input.options["tabular"])

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        from ocd_core.preprocess import RowError, encode_row

        try:
            return encode_row(self.spec, value, field)
        except RowError as e:
            raise InputError(e.field, e.reason) from None

    def v2_inputs(self) -> list[dict[str, Any]]:
        return [
            {"name": f.name, "datatype": "FP32" if f.kind == "number" else "BYTES", "shape": [-1]}
            for f in self.spec.fields
        ]

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        names = [f.name for f in self.spec.fields]
        by_name = {t["name"]: t for t in inputs}
        for name in by_name:
            if name not in names:
                raise InputError(f"inputs[{name}]", f"unknown input; expected {names}")
        columns, n = {}, None
        for name in names:
            if name not in by_name:
                raise InputError(f"inputs[{name}]", "missing input")
            data = _flatten(by_name[name]["data"])
            if n is not None and len(data) != n:
                raise InputError(f"inputs[{name}].data", f"holds {len(data)} rows, other inputs hold {n}")
            n, columns[name] = len(data), data
        return [self.decode_json({k: columns[k][i] for k in names}, f"inputs[row {i}]") for i in range(n or 0)]

    # (Training encodes val/test categories unseen in train as missing; a request with one gets 422.)

    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        if self.manifest.task == "classification":
            return super().encode(p, return_uncertainty)
        from ocd_core.preprocess import decode_target

        value = decode_target(self.spec, p.mean)
        std = p.uncertainty * self.spec.target_std
        scalar = value.numel() == 1
        return {
            "value": value.item() if scalar else value.tolist(),
            "uncertainty": (std.item() if scalar else std.tolist()) if return_uncertainty else None,
        }

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        if self.manifest.task == "classification":
            return super().encode_v2(preds)
        from ocd_core.preprocess import decode_target

        vals = torch.stack([decode_target(self.spec, p.mean) for p in preds])
        unc = torch.stack([p.uncertainty * self.spec.target_std for p in preds])
        return [
            {"name": "value", "datatype": "FP32", "shape": list(vals.shape), "data": vals.flatten().tolist()},
            {"name": "uncertainty", "datatype": "FP32", "shape": list(unc.shape), "data": unc.flatten().tolist()},
        ]


class AudioModality(Modality):
    """A WAV clip: uploaded (multipart) or base64 in JSON; PCM 8/16/24/32-bit at any common sample
    rate (resampled), stereo mixed down; featurised with the log-mel front end used in training."""

    name = "audio"
    inline_bytes = 0  # resampling and the log-mel front end: always on a worker thread

    def __init__(self, manifest: Manifest):
        super().__init__(manifest)
        from ocd_core.audio import AudioSpec, mel_filterbank

        self.spec = AudioSpec.model_validate(manifest.input.options["audio"])
        self.fb = mel_filterbank(self.spec)

    def _features(self, data: bytes, field: str) -> torch.Tensor:
        from ocd_core.audio import AudioError, clip_to_features, read_wav

        try:
            wav, rate = read_wav(data)
            if not 4000 <= rate <= 192000:
                raise AudioError(f"sample rate {rate} Hz is outside 4000..192000 Hz", 422)
            return self.normalise(clip_to_features(wav, rate, self.spec, self.fb))
        except AudioError as e:
            raise InputError(field, e.reason, e.status) from None

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        if not isinstance(value, str):
            raise InputError(field, f"expected a base64-encoded WAV file, got {type(value).__name__}")
        b64 = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(field, "expected a base64-encoded WAV file") from None
        return self._features(data, field)

    def decode_upload(
        self, data: bytes, filename: str | None, content_type: str | None, field: str = "file"
    ) -> torch.Tensor:
        return self._features(data, field)

    def v2_inputs(self) -> list[dict[str, Any]]:
        return [{"name": "audio", "datatype": "BYTES", "shape": [-1]}]

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        by_name = {t["name"]: t for t in inputs}
        if "audio" not in by_name:
            raise InputError("inputs", f"expected an input named 'audio' (base64 WAV per clip), got {sorted(by_name)}")
        if by_name["audio"]["datatype"] != "BYTES":
            raise InputError("inputs[audio].datatype", f"expected BYTES, got {by_name['audio']['datatype']}")
        return [self.decode_json(v, f"inputs[audio][{i}]") for i, v in enumerate(_flatten(by_name["audio"]["data"]))]


class PoseModality(Modality):
    """A camera pose in, a rendered image out (tinyNeRF): {"azimuth": deg, "elevation": deg,
    "radius": r} or [azimuth, elevation, radius]. /predict answers a base64 PNG, /render the PNG
    itself, v2 the image tensor (N, 3, H, W) in [0, 1]; the uncertainty is the ensemble's mean
    per-pixel std."""

    name = "pose"
    KEYS = ("azimuth", "elevation", "radius")
    RADIUS = (1.0, 50.0)

    def decode_json(self, value: Any, field: str = "input") -> torch.Tensor:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.KEYS))
            if unknown:
                raise InputError(f"{field}.{unknown[0]}", f"unknown field; a pose has {', '.join(self.KEYS)}")
            missing = [k for k in self.KEYS if k not in value]
            if missing:
                raise InputError(f"{field}.{missing[0]}", "missing")
            for k in self.KEYS:
                if isinstance(value[k], bool) or not isinstance(value[k], (int, float)):
                    raise InputError(f"{field}.{k}", f"expected a number, got {type(value[k]).__name__}")
            value = [value[k] for k in self.KEYS]
        x = self.check_array(value, field)
        return self._check_pose(x, field)

    def _check_pose(self, x: torch.Tensor, field: str) -> torch.Tensor:
        if not -90 <= float(x[1]) <= 90:
            raise InputError(f"{field}.elevation", f"must be between -90 and 90 degrees, got {float(x[1]):g}")
        lo, hi = self.RADIUS
        if not lo <= float(x[2]) <= hi:
            raise InputError(f"{field}.radius", f"must be between {lo:g} and {hi:g}, got {float(x[2]):g}")
        return x

    def decode_v2(self, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        return [self._check_pose(x, f"inputs[input][{i}]") for i, x in enumerate(super().decode_v2(inputs))]

    def png(self, p: SamplePrediction) -> bytes:
        """The ensemble mean (3, H, W) as PNG bytes."""
        from PIL import Image

        img = (p.mean.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="PNG")
        return buf.getvalue()

    def encode(self, p: SamplePrediction, return_uncertainty: bool = True) -> dict[str, Any]:
        return {
            "image": base64.b64encode(self.png(p)).decode(),
            "uncertainty": float(p.uncertainty.mean()) if return_uncertainty else None,
        }

    def v2_outputs(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [-1, *self.manifest.input.options.get("image", [3, -1, -1])],
            },
            {"name": "uncertainty", "datatype": "FP32", "shape": [-1]},
        ]

    def encode_v2(self, preds: list[SamplePrediction]) -> list[dict[str, Any]]:
        imgs = torch.stack([p.mean for p in preds])
        return [
            {"name": "image", "datatype": "FP32", "shape": list(imgs.shape), "data": imgs.flatten().tolist()},
            {
                "name": "uncertainty",
                "datatype": "FP32",
                "shape": [len(preds)],
                "data": [float(p.uncertainty.mean()) for p in preds],
            },
        ]


MODALITIES: dict[str, type[Modality]] = {
    "tensor": Modality,
    "image": ImageModality,
    "tabular": TabularModality,
    "audio": AudioModality,
    "pose": PoseModality,
}


def modality_for(manifest: Manifest) -> Modality:
    try:
        return MODALITIES[manifest.modality](manifest)
    except KeyError:
        raise ValueError(
            f"model {manifest.name}: unknown modality {manifest.modality!r}; known: {sorted(MODALITIES)}"
        ) from None
