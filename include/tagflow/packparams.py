"""How images are packed (`PackParams`): the im2rec options, the split ratio and the pixel limit, with a digest that
names the packed bytes. Light on purpose: the data plane's spec and the run's requests carry these without loading
the image stack (OpenCV, simplejpeg, Pillow), which only `tagflow.pack` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from tagflow.errors import InputError, quote

ENCODER_VERSION = 3  # bump when the native engine's output bytes change for the same input
# Images above this many pixels are refused from their header, before any pixel is decoded: decoding costs up to
# ~13 bytes per source pixel at once (Pillow's 4-byte RGBX, the array copy, the resize input), so this bounds pack's
# memory per worker thread (BENCHMARKS.md has the measured peak). 4096×4096 is 256 times the seed's ~256-px designs
# and admits 12-megapixel camera photos (4032×3024); raise PackParams.max_pixels for larger sources.
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class PackParams:
    """How images are packed: the im2rec options `--resize`, `--center-crop`, `--quality`, `--encoding`, and the
    largest source image accepted (`max_pixels`, width × height read from its header; larger ones are bad images)."""

    resize: int = 96
    center_crop: bool = False
    quality: int = 95
    encoding: str = ".jpg"
    train_ratio: float = 0.9
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.encoding not in (".jpg", ".png"):
            raise InputError(f"encoding {self.encoding!r}: expected '.jpg' or '.png'")
        if self.resize < 0:
            raise InputError(f"resize {self.resize}: expected a size in pixels ≥ 1, or 0 for no resize")
        if self.encoding == ".jpg" and not 1 <= self.quality <= 100:
            raise InputError(f"quality {self.quality}: JPEG quality must be 1..100")
        if self.encoding == ".png" and not 0 <= self.quality <= 9:
            raise InputError(f"quality {self.quality}: PNG compression level must be 0..9 (as in im2rec)")
        if not 0.0 <= self.train_ratio <= 1.0:
            raise InputError(f"train ratio {self.train_ratio}: expected a fraction in 0..1")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise InputError(f"max pixels {quote(self.max_pixels)}: expected a whole number of pixels ≥ 1")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def digest(self) -> str:
        """A stable hash of the parameters and the native encoder's version: equal digests, equal bytes.

        `max_pixels` counts only when it is not the default: it never changes the bytes of an image it admits, and
        packs staged before it existed (none of whose images came near the default) keep their digests.
        """
        params = self.to_dict()
        if self.max_pixels == DEFAULT_MAX_PIXELS:
            del params["max_pixels"]
        import cv2  # here, not at import: a task that only builds a spec needs no image stack
        import PIL
        import simplejpeg

        key = {
            **params,
            "encoder": ENCODER_VERSION,
            "simplejpeg": simplejpeg.__version__,
            "pillow": PIL.__version__,
            "opencv": cv2.__version__,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
