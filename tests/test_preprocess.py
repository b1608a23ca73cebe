"""Image loading and CLIP preprocessing: every pixel format, orientation, size and bad file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdiqa_edge.preprocess import (
    ImageLoadError,
    PreprocessSpec,
    load_preprocessed,
    normalize,
    open_image,
    preprocess_pil,
)

SPEC = PreprocessSpec()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + blobs), so resampling differences are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        value = 128 + 60 * np.sin(x / rng.uniform(15, 60) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(15, 60))
        value += 40 * np.exp(-((x - rng.uniform(0, width)) ** 2 + (y - rng.uniform(0, height)) ** 2) / 4000.0)
        channels.append(value)
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def test_matches_open_clip_transform_to_one_grey_level():
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(224, is_train=False, mean=SPEC.mean, std=SPEC.std,
                                          interpolation="bicubic", resize_mode="shortest")
    for size in ((1024, 768), (333, 517), (224, 224), (180, 120)):
        image = _photo(*size, seed=size[0])
        theirs = transform(image).numpy()  # float CHW, normalized
        ours = normalize(preprocess_pil(image, SPEC)[None], SPEC)[0]
        pixels = (theirs.transpose(1, 2, 0) * np.asarray(SPEC.std) + np.asarray(SPEC.mean)) * 255.0
        mine = (ours.transpose(1, 2, 0) * np.asarray(SPEC.std) + np.asarray(SPEC.mean)) * 255.0
        assert theirs.shape == ours.shape == (3, 224, 224)
        assert np.abs(pixels - mine).max() <= 1.0, size


def test_draft_mode_decodes_large_jpegs_close_to_the_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    _photo(1024, 768).save(path, quality=92)
    with Image.open(path) as img:
        img.draft("RGB", (224, 224))
        assert img.size == (512, 384)  # libjpeg scaled by 1/2: still above 224 on the short side
    drafted = load_preprocessed(path, SPEC).astype(np.int16)
    plain = load_preprocessed(path, PreprocessSpec(draft=False)).astype(np.int16)
    assert drafted.shape == plain.shape == (224, 224, 3)
    assert np.abs(drafted - plain).mean() < 2.0


def test_a_phones_multi_picture_jpeg_is_draft_decoded_as_its_first_picture_is(tmp_path):
    """Pillow opens a JPEG with a multi-picture index (Android's Ultra HDR gain map, depth or preview frames) as
    format MPO: it was decoded in full, 4x the time of a plain JPEG of the same size, in score and the caches."""
    photo = _photo(1024, 768)
    plain, multi = tmp_path / "plain.jpg", tmp_path / "ultra-hdr.jpg"
    photo.save(plain, quality=92)
    photo.save(multi, format="MPO", save_all=True, append_images=[photo.resize((256, 192))], quality=92)
    with Image.open(multi) as img:
        assert img.format == "MPO"
    drafted = load_preprocessed(multi, SPEC)
    assert np.array_equal(drafted, load_preprocessed(plain, SPEC))  # the first picture, drafted as a JPEG is
    assert not np.array_equal(drafted, load_preprocessed(multi, PreprocessSpec(draft=False)))


def test_small_images_are_upscaled_not_skipped(tmp_path):
    path = tmp_path / "small.png"
    _photo(100, 60).save(path)
    out = load_preprocessed(path, SPEC)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and out.std() > 5


def _png_48bit(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA-transparency", "RGBA", "CMYK", "I;16", "RGB;16"])
def test_pixel_formats_convert_to_rgb_correctly(mode, tmp_path):
    path = tmp_path / "image.png"
    if mode == "L":
        Image.new("L", (240, 240), 77).save(path)
        expect = (77, 77, 77)
    elif mode == "LA":
        Image.new("LA", (240, 240), (0, 0)).save(path)  # transparent black -> the white background
        expect = (255, 255, 255)
    elif mode == "P":
        img = Image.new("P", (240, 240), 3)
        img.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] + [0] * (256 * 3 - 12))
        img.save(path)
        expect = (200, 100, 50)
    elif mode == "PA-transparency":
        img = Image.new("P", (240, 240), 1)
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
        img.save(path, transparency=1)  # index 1 (blue) is transparent -> white
        expect = (255, 255, 255)
    elif mode == "RGBA":
        Image.new("RGBA", (240, 240), (255, 0, 0, 128)).save(path)  # half-transparent red on white
        expect = (255, 127, 127)
    elif mode == "CMYK":
        path = tmp_path / "image.jpg"
        Image.new("CMYK", (240, 240), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
        expect = (255, 0, 0)
    elif mode == "RGB;16":  # 48-bit colour: each channel scaled to 8 bits
        _png_48bit(path, np.broadcast_to(np.array([65535, 32768, 1028], np.uint16), (240, 240, 3)))
        expect = (255, 128, 4)
    else:  # 16-bit grey: scaled to 8 bits, not clipped at 255
        Image.fromarray(np.full((240, 240), 32768, dtype=np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
        expect = (128, 128, 128)
    out = load_preprocessed(path, SPEC)
    assert out.shape == (224, 224, 3)
    np.testing.assert_allclose(out[112, 112].astype(int), expect, atol=3 if mode == "CMYK" else 1)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.full((200, 300, 3), 255, np.uint8)
    pixels[:80, :80] = (255, 0, 0)  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = np.asarray(open_image(path))
    assert upright.shape == (300, 200, 3)  # portrait once rotated
    assert upright[20, 180, 0] > 200 and upright[20, 180, 1] < 60  # the block is now top-right
    assert upright[20, 20, 1] > 200  # and top-left is white


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 40_000])  # above PIL's warning limit, and above its error limit
def test_decompression_bombs_are_refused_before_decoding(side, tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    assert path.stat().st_size < 200
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_preprocessed(path, SPEC)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file\n", "not an image"),
    (None, "file not found"),
])
def test_bad_files_raise_a_one_line_reason(content, reason, tmp_path):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason):
        load_preprocessed(path, SPEC)


def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path):
    path = tmp_path / "cut.jpg"
    _photo(640, 480).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="unreadable"):
        load_preprocessed(path, SPEC)


def test_normalize_is_clip_mean_std_nchw():
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    batch[..., 0] = 255
    out = normalize(batch, SPEC)
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    assert out[0, 0, 0, 0] == pytest.approx((1 - SPEC.mean[0]) / SPEC.std[0])
    assert out[1, 2, 3, 3] == pytest.approx(-SPEC.mean[2] / SPEC.std[2])


def _open_clip_pixels(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """open_clip's own eval transform (torchvision resize + centre crop), back in 0..255 pixel units, HWC."""
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std,
                                          interpolation=spec.interpolation, resize_mode="shortest")
    chw = transform(image).numpy()
    return (chw.transpose(1, 2, 0) * np.asarray(spec.std) + np.asarray(spec.mean)) * 255.0


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    data = pytest.importorskip("skimage.data")
    return [Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
            for name in ("astronaut", "chelsea", "coffee", "rocket")]


# (width, height): landscape and portrait photos (Pillow runs the full resize's passes in either order),
# portraits taller than 2:1 (vertical pass first in Pillow 13), upscales, strips of 1-7 pixels, squares.
SHAPES = [(512, 384), (384, 512), (300, 700), (700, 300), (230, 700), (640, 225), (160, 120), (90, 200),
          (7, 450), (450, 7), (3, 600), (600, 1), (1, 300), (224, 500), (500, 224), (333, 333), (225, 1000)]


@pytest.mark.parametrize("spec", [SPEC, PreprocessSpec(size=64), PreprocessSpec(interpolation="bilinear")],
                         ids=["224-bicubic", "64-bicubic", "224-bilinear"])
def test_window_resize_matches_open_clip_on_every_shape(photos, spec):
    """Only the crop's window is resized, yet every pixel is open_clip's within one grey level."""
    worst, exact = 0.0, 0
    for i, (width, height) in enumerate(SHAPES):
        photo = photos[i % len(photos)]
        image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(0, 0, min(photo.width, width * 4),
                                                                           min(photo.height, height * 4)))
        ours = preprocess_pil(image, spec).astype(np.float64)
        theirs = _open_clip_pixels(image, spec)
        assert ours.shape == theirs.shape == (spec.size, spec.size, 3)
        difference = np.abs(ours - theirs).max()
        worst, exact = max(worst, difference), exact + (difference < 0.01)
        assert difference <= 1.0 + 1e-4, (width, height, difference)
    assert exact >= len(SHAPES) // 2, f"only {exact} of {len(SHAPES)} shapes bit-identical"


def test_thin_strips_past_the_exact_pass_budget_stay_within_a_grey_level(monkeypatch):
    """Past EXACT_PASS_BYTES the longer side's first pass runs on its window too (PIL's float32 box)."""
    from kdiqa_edge import preprocess

    monkeypatch.setattr(preprocess, "EXACT_PASS_BYTES", 0)
    rng = np.random.default_rng(0)
    for width, height in ((700, 4), (1500, 2), (640, 100), (5000, 1)):
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert np.abs(preprocess_pil(noise, SPEC) - _open_clip_pixels(noise, SPEC)).max() <= 1.0 + 1e-4


def test_an_extreme_aspect_ratio_needs_memory_of_the_output_not_of_the_resize(tmp_path):
    """2 x 60000 (a 400 kB PNG): the full shorter-side resize is 224 x 6.72M (4.5 GB). Under a 512 MB
    address-space limit the window resize decodes it; resizing everything first raised MemoryError."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for name, shape in (("tall.png", (60000, 2, 3)), ("wide.png", (2, 60000, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (512 << 20, resource.RLIM_INFINITY))\n"
        "from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed\n"
        "for path in sys.argv[1:]:\n"
        "    assert load_preprocessed(path, PreprocessSpec()).shape == (224, 224, 3)\n"
    )
    pytest.importorskip("resource")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tall.png"), str(tmp_path / "wide.png")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


def test_normalize_by_lookup_gives_the_arithmetics_bits():
    """`normalize` looks the 256 values up per channel: bit for bit what (x / 255 - mean) / std gives."""
    from kdiqa_edge.preprocess import PreprocessSpec, normalize

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 17, 13, 3), dtype=np.uint8)
    batch[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    for spec in (PreprocessSpec(), PreprocessSpec(mean=(0.5, 0.25, 0.1), std=(0.2, 0.3, 0.7))):
        expected = (batch.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)) \
            / np.asarray(spec.std, np.float32)
        got = normalize(batch, spec)
        assert got.dtype == np.float32 and got.shape == (3, 3, 17, 13) and got.flags.c_contiguous
        assert np.array_equal(got, expected.transpose(0, 3, 1, 2))


def test_a_bomb_is_refused_whatever_another_decode_thread_did_to_the_warning_filters(tmp_path, monkeypatch):
    """Decode threads share the process's warning filters: the refusal must not hang on Pillow's warning
    becoming an error in this thread (another thread's catch_warnings may have just restored the filters)."""
    import warnings

    from kdiqa_edge.runtime.pipeline import decode_files, preprocessed, walk

    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 10_000, 10_000)  # over Pillow's warning limit, under its error limit
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(photo)
    before = list(warnings.filters)
    rows = list(decode_files(walk([bomb, photo] * 40), preprocessed(SPEC), workers=4))
    assert [row.error is None for row in rows] == [False, True] * 40
    assert all("decompression bomb" in row.error for row in rows[::2])
    assert warnings.filters == before  # no decode thread left a filter behind

    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # the filter lost to a race
    with warnings.catch_warnings(record=True), pytest.raises(ImageLoadError, match="decompression bomb"):
        load_preprocessed(bomb, SPEC)
