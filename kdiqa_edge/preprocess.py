"""Image loading and CLIP preprocessing with PIL + numpy only (no torch).

The SAME functions build the training image cache and feed the torch-free runtime, so training and
deployment see identical pixels by construction. The spec travels with every checkpoint and artifact.
The resize and crop follow torchvision on PIL images (what open_clip's transform runs): shorter side to
`size` with PIL bicubic, then a centre crop with torchvision's rounding.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Larger than any IQA photo (SPAQ's biggest is ~4000x4000 = 16 MP), far below a decompression bomb.
MAX_PIXELS = 120_000_000

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224  # output is size x size
    interpolation: str = "bicubic"  # PIL filter used for the shorter-side resize
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # per-channel, on [0, 1] pixels
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    draft: bool = True  # let libjpeg decode large JPEGs at 1/2, 1/4, 1/8 scale before resizing

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resize": "shortest", "crop": "center"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        return cls(**kwargs)

    @property
    def key(self) -> str:
        """A short stable string for cache keys."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class ImageLoadError(Exception):
    """An image that cannot be used; the message is the reason shown in skip reports."""


def open_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, upright (EXIF orientation applied), alpha composited on white.

    Raises ImageLoadError with a one-line reason for missing, empty, truncated, non-image, or bomb files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageLoadError("file not found") from None
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > MAX_PIXELS:
                raise ImageLoadError(f"too many pixels ({img.width}x{img.height}): possible decompression bomb")
            if draft_size and img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft(img.mode, (draft_size, draft_size))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when already upright
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"unreadable image: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit grey is scaled (not clipped), alpha goes on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Shorter side to spec.size, centre crop: uint8 HWC [size, size, 3]."""
    size = spec.size
    width, height = img.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), _INTERPOLATION[spec.interpolation])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def load_preprocessed(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Decode one file into the model's uint8 HWC input (the image-cache and runtime path)."""
    return resize_crop(open_image(path, draft_size=spec.size if spec.draft else None), spec)


def preprocess_pil(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return resize_crop(to_rgb(ImageOps.exif_transpose(img)), spec)


def normalize(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW normalized with the spec's mean/std."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
