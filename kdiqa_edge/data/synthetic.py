"""The built-in synthetic IQA set: scikit-image's bundled photographs, distorted, scored by SSIM.

It lets every command run offline. Reference contents are views (whole frame, then crops) of the colour
photographs that ship inside scikit-image; each is distorted by six distortions at five levels and gets a
pseudo-MOS from a full-reference measure, so a blind model has a real task: predict SSIM-quality from the
distorted image alone.

    pseudo-MOS = 1 + 4 / (1 + exp(-(SSIM - 0.85) / 0.05))

SSIM as Wang et al. (2004): Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range 255, mean over the
Y, Cb and Cr planes (so that colour-only distortions count), against the undistorted reference.
"""

from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from kdiqa_edge import paths
from kdiqa_edge.data._lock import file_lock
from kdiqa_edge.data._progress import Progress
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.io import atomic_path, sweep_temporaries

VERSION = 1  # bump when the generator changes: the cached default set is keyed on it
DEFAULT_REFS = 12
DEFAULT_SEED = 0
SIZE = (320, 240)  # width, height of every image (4:3, shorter side above the 224 crop)
LEVELS = 5
SSIM_CENTRE, SSIM_SLOPE = 0.85, 0.05  # the fixed logistic from SSIM to pseudo-MOS

# Colour photographs bundled with scikit-image (no download): name -> loader attribute.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle")

# Per distortion, the parameter at levels 1..5 (mildest first).
DISTORTIONS = {
    "blur": (0.7, 1.3, 2.2, 3.5, 5.5),  # Gaussian sigma, pixels
    "noise": (1.5, 3.0, 5.0, 8.0, 12.0),  # white Gaussian noise std, grey levels (per RGB channel)
    "jpeg": (40, 20, 10, 6, 3),  # JPEG quality
    "contrast": (0.7, 0.5, 0.35, 0.22, 0.12),  # blend factor towards the mean grey
    "saturation": (0.5, 0.25, 0.0, 3.0, 4.5),  # blend factor from greyscale: 1-3 wash out, 4-5 oversaturate
    "pixelate": (1.6, 2.2, 3.2, 4.5, 6.5),  # downsampling factor, upsampled back with nearest
}


def default_root(refs: int | None = None, seed: int = DEFAULT_SEED) -> Path:
    """The default synthetic set in the user cache dir, generated on first use."""
    refs = DEFAULT_REFS if refs is None else refs
    root = paths.cache_dir() / "synthetic" / f"v{VERSION}-refs{refs}-seed{seed}"
    if not (root / "scores.csv").is_file():
        with file_lock(root.parent / f".{root.name}.lock"):
            if not (root / "scores.csv").is_file():  # another process may have made it meanwhile
                generate(root, refs=refs, seed=seed, progress=True)
    return root


def generate(out: str | Path, refs: int = DEFAULT_REFS, seed: int = DEFAULT_SEED, progress: bool = False,
             size: tuple[int, int] = SIZE) -> Path:
    """Write the set to `out` (images/, refs/, scores.csv, README) atomically; deterministic for a seed.

    `size` (width, height) is every image's size. The default suits 224 px models; a model with a smaller
    input (the tiny test teacher's 64 px) sees little of the noise and JPEG distortions after downscaling
    320x240 to its size, so generate at its own resolution (e.g. 86x64) to give it a learnable task."""
    if refs < 1:
        raise ConfigError(f"--refs must be at least 1, got {refs}")
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"--size must be WIDTHxHEIGHT with both at least 16, got {size}")
    out = Path(out)
    if out.exists() and not _replaceable(out):
        raise ConfigError(f"{out} exists and is not a synthetic set made by kdiqa-edge: choose a new folder")
    rng = np.random.default_rng(seed)
    references = _references(refs, rng, (int(size[0]), int(size[1])))
    total = refs * len(DISTORTIONS) * LEVELS
    sweep_temporaries(out.parent, out.name)  # a set a killed run left half-written (the folder is the user's)
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "refs").mkdir()
        rows = []
        with Progress(progress, total, "generating the synthetic set") as advance:
            for ref_index, reference in enumerate(references):
                ref = f"r{ref_index:02d}"
                Image.fromarray(reference).save(tmp / "refs" / f"{ref}.png")
                for distortion, params in DISTORTIONS.items():
                    for level, param in enumerate(params, start=1):
                        noise_seed = (seed, ref_index, level)
                        distorted = distort(reference, distortion, param, noise_seed)
                        quality = ssim(reference, distorted)
                        image = f"images/{ref}_{distortion}_{level}.png"
                        Image.fromarray(distorted).save(tmp / image, compress_level=1)
                        rows.append([image, f"{pseudo_mos(quality):.4f}", ref, distortion, level, f"{quality:.5f}"])
                        advance()
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "mos", "ref", "distortion", "level", "ssim"])
        writer.writerows(rows)
        (tmp / "scores.csv").write_text(buffer.getvalue())
        (tmp / "README").write_text(_readme(refs, seed, len(rows), size))
    return out


def _replaceable(out: Path) -> bool:
    """Only an empty folder or an earlier synthetic set may be replaced (never the user's other files)."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    readme = out / "README"
    return readme.is_file() and readme.read_text(errors="replace").startswith("kdiqa-edge synthetic IQA set")


def pseudo_mos(quality: float) -> float:
    return 1.0 + 4.0 / (1.0 + math.exp(-(quality - SSIM_CENTRE) / SSIM_SLOPE))


def ssim(reference: np.ndarray, distorted: np.ndarray) -> float:
    """Mean SSIM over the Y, Cb, Cr planes (uint8 RGB inputs)."""
    from skimage.metrics import structural_similarity

    a, b = _ycbcr(reference), _ycbcr(distorted)
    return float(structural_similarity(a, b, channel_axis=2, data_range=255.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def distort(image: np.ndarray, distortion: str, param: float, noise_seed: tuple[int, ...]) -> np.ndarray:
    """One distortion of a uint8 RGB image (deterministic: noise comes from `noise_seed`)."""
    pil = Image.fromarray(image)
    if distortion == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=param)))
    if distortion == "noise":
        noise = np.random.default_rng(list(noise_seed)).normal(0.0, param, image.shape)
        return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)
    if distortion == "jpeg":
        buffer = _io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(param))
        return np.asarray(Image.open(buffer).convert("RGB"))
    if distortion == "contrast":
        return np.asarray(ImageEnhance.Contrast(pil).enhance(param))
    if distortion == "saturation":
        return np.asarray(ImageEnhance.Color(pil).enhance(param))
    if distortion == "pixelate":
        small = (max(1, round(pil.width / param)), max(1, round(pil.height / param)))
        return np.asarray(pil.resize(small, Image.Resampling.BOX).resize(pil.size, Image.Resampling.NEAREST))
    raise ValueError(f"unknown distortion {distortion!r}")


def _references(count: int, rng: np.random.Generator, size: tuple[int, int]) -> list[np.ndarray]:
    """`count` contents: each photo's whole frame first, then random crops (40-70% of the frame)."""
    photos = [_photo(name) for name in PHOTOS]
    order = rng.permutation(len(photos))
    views = []
    for index in range(count):
        photo = photos[order[index % len(photos)]]
        whole = index < len(photos)
        views.append(_view(photo, rng, 1.0 if whole else rng.uniform(0.4, 0.7), size))
    return views


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]
    return np.ascontiguousarray(image[..., :3])


def _view(photo: np.ndarray, rng: np.random.Generator, fraction: float, size: tuple[int, int]) -> np.ndarray:
    """A 4:3 window covering `fraction` of the largest 4:3 window, resized to `size`."""
    height, width = photo.shape[:2]
    full_w = min(width, height * 4 // 3)
    crop_w = max(SIZE[0] // 2, int(full_w * fraction))
    crop_h = crop_w * 3 // 4
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    window = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    return np.asarray(window.resize(size, Image.Resampling.LANCZOS))


def _ycbcr(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("YCbCr"), dtype=np.float64)


def _readme(refs: int, seed: int, count: int, size: tuple[int, int] = SIZE) -> str:
    distortions = "\n".join(f"- {name}: {', '.join(str(p) for p in params)}" for name, params in DISTORTIONS.items())
    return f"""kdiqa-edge synthetic IQA set (generator v{VERSION}, refs={refs}, seed={seed}, {count} images)

Made by `kdiqa-edge data synth` (kdiqa_edge/data/synthetic.py). Deterministic for the seed.

Contents: {refs} reference contents (refs/r00.png ...), each a {size[0]}x{size[1]} view of a colour photograph bundled
with scikit-image ({", ".join(PHOTOS)}):
every photo's whole frame first, then seeded random crops of 40-70% of the frame for more contents.

Each reference is distorted by {len(DISTORTIONS)} distortions at {LEVELS} levels (parameters, mildest first):
{distortions}
(blur: Gaussian sigma in pixels; noise: std in grey levels per RGB channel; jpeg: quality; contrast:
PIL ImageEnhance.Contrast factor, 1 = unchanged; saturation: ImageEnhance.Color factor, levels 1-3 wash
the colour out (0 = grey), levels 4-5 oversaturate; pixelate: box downsampling factor, upsampled back
with nearest neighbour.)

Pseudo-MOS (1..5, higher is better), a full-reference measure through a fixed logistic:
    mos = 1 + 4 / (1 + exp(-(SSIM - {SSIM_CENTRE}) / {SSIM_SLOPE}))
SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range 255) against the reference,
averaged over the Y, Cb and Cr planes.

Layout: images/<ref>_<distortion>_<level>.png, refs/<ref>.png,
scores.csv with columns image, mos, ref, distortion, level, ssim.
"""
