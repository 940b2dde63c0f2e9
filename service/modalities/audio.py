"""Audio clips: WAV files (uploaded, base64 in JSON, or v2 BYTES) -> log-mel features."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import torch

from ocd_core.bundle import Manifest

from ..errors import InputError
from .base import Modality, flatten


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
        return [self.decode_json(v, f"inputs[audio][{i}]") for i, v in enumerate(flatten(by_name["audio"]["data"]))]
