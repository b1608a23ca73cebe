"""Local quality maps at run time, torch-free: where in the photo the model finds the quality lost.

Two kinds (MAP_KINDS), each an array of scores in the head's units (1 bad .. 5 perfect) over a grid on the
region the model sees, the centre square of the photo (the crop `score` scores):

- `fast`: the artifact's own `score_map` output [h, w] (`kdiqa-edge export --with-map`): the quality head at
  every position of the student's final feature map, from the same forward pass as the score
  (kdiqa_edge/models/maps.py). 7x7 at 224 px for the paper's students, 2x2 for the 64 px test student. Any
  artifact made with --with-map, and a checkpoint or run dir (through torch), has it.
- `patches` (PaQ-2-PiQ style): the model scores overlapping crops of the photo, each crop cut from the
  original image at full resolution and resized to the model's input as a whole photo would be. Cell (i, j) of
  a PATCH_GRID x PATCH_GRID grid gets the score of the crop PATCH_FRACTION of the region's side wide centred
  on it (shifted inward at the edges). PATCH_GRID^2 model runs, one batch; any artifact. Each crop is a
  whole input to the model, which is what it was trained on, but at a larger scale than the photo it was
  trained on (and small regions of a small photo are upscaled).

`score_map(model, image, kind)` returns the array; `quality_map` also the global score and the region;
`write_maps(model, files, out, kind)` writes per image an overlay PNG (the map upsampled onto the region,
a colour scale in score units 1..5, the global score in the corner) and the raw map as .npy, and yields one
row per file, with the reason where one cannot be read.

Backends return the score only (the `Backend` protocol); the runners below read the `score_map` output of
each runtime's session object directly (`MAP_RUNNERS`, one per backend name).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.preprocess import (
    ImageLoadError,
    PreprocessSpec,
    crop_box,
    load_preprocessed,
    open_image,
    open_image_bytes,
)
from kdiqa_edge.runtime.info import ArtifactInfo

ImageLike = str | Path | Image.Image | np.ndarray | bytes  # what QualityModel.score takes


class QualityModel(Protocol):
    """What maps use of a `runtime.model.QualityModel` (which calls into this module: `score_map`)."""

    backend: Any
    info: ArtifactInfo
    preprocess: PreprocessSpec

    def prepare(self, images: np.ndarray) -> np.ndarray: ...

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray: ...

    def load_image(self, image: ImageLike) -> np.ndarray: ...

MAP_OUTPUT = "score_map"  # the artifact output (kdiqa_edge/models/maps.py names it too)
MAP_KINDS = ("fast", "patches")
PATCH_GRID = 4  # patches: cells per side
PATCH_FRACTION = 0.5  # patches: each crop's side, as a fraction of the region's side
OVERLAY_SIDE = 512  # the overlay's photo, in pixels (the region resized to it)
OVERLAY_ALPHA = 0.5
COLORMAP = "RdYlGn"  # red = 1 (bad) .. green = 5 (perfect)
SCORE_RANGE = (1.0, 5.0)


@dataclasses.dataclass(frozen=True)
class QualityMap:
    kind: str  # fast | patches
    score: float  # the global score of the image (what `score` prints for it)
    values: np.ndarray  # float32 [h, w], score units, row 0 at the top of the region
    # the region of the image the map covers (the model's centre crop), as fractions of its width and height:
    # (left, top, right, bottom)
    region: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class MapRow:
    """One file of `write_maps`: what was written for it, or why nothing was."""

    path: str
    score: float | None = None
    overlay: str | None = None  # the PNG
    array: str | None = None  # the .npy
    shape: tuple[int, int] | None = None
    error: str | None = None


def has_map_output(quality_model: QualityModel) -> bool:
    """Whether `fast` maps come with this model: an artifact exported --with-map, or a checkpoint (torch)."""
    return quality_model.backend.name == "torch" or MAP_OUTPUT in quality_model.info.outputs


def check_kind(quality_model: QualityModel, kind: str) -> None:
    """A one-line ConfigError for a map kind this model cannot give (before any image is read)."""
    if kind not in MAP_KINDS:
        raise ConfigError(f"unknown map kind {kind!r}; choose one of: {', '.join(MAP_KINDS)}")
    if kind != "fast":
        return
    name = quality_model.info.path.name
    if not has_map_output(quality_model):
        raise ConfigError(f"{name} has no {MAP_OUTPUT} output: export it with `kdiqa-edge export --with-map` for "
                          "fast maps, or use --map-kind patches (any model)")
    if quality_model.backend.name == "torch":  # a checkpoint: a student with a feature map has one
        from kdiqa_edge.errors import ExportError
        from kdiqa_edge.models.maps import check_map

        try:
            check_map(quality_model.backend.model)
        except ExportError as exc:
            raise ConfigError(f"{name}: {exc}; use --map-kind patches") from None
    if quality_model.backend.name not in MAP_RUNNERS:
        raise ConfigError(f"reading {MAP_OUTPUT} through {quality_model.backend.name} is not supported here: use "
                          f"the ONNX file the engine was built from, or --map-kind patches")


# --- running the score_map output, per runtime ----------------------------------------------------------


def _onnx(backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score, score_map = backend.session.run(["score", MAP_OUTPUT], {backend.input_name: x})
    return score, score_map


def _openvino(backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outputs = [backend.compiled.output("score"), backend.compiled.output(MAP_OUTPUT)]
    score, score_map = backend.infer(x, outputs)
    return score, score_map


def _executorch(backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch  # executorch's Python runtime brings it (the backend imported it already)

    out = backend.forward.execute([torch.from_numpy(np.ascontiguousarray(x))])
    outputs = list(backend.info.outputs)
    return out[outputs.index("score")].numpy(), out[outputs.index(MAP_OUTPUT)].numpy()


def _coreml(backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hwc = x if backend.info.input.layout == "NHWC" else x.transpose(0, 2, 3, 1)
    outputs = backend.model.predict([{backend.input_name: Image.fromarray(img)} for img in hwc])
    return (np.array([np.asarray(o["score"]).reshape(-1)[0] for o in outputs]),
            np.stack([np.asarray(o[MAP_OUTPUT]).reshape(np.asarray(o[MAP_OUTPUT]).shape[-2:]) for o in outputs]))


def _torch(backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint: the model's own fast map (torch is there: the backend loaded it)."""
    import torch

    from kdiqa_edge.models.maps import fast_map

    with torch.inference_mode():
        pixels = torch.from_numpy(np.ascontiguousarray(x)).to(backend.device)
        return backend.model(pixels).float().cpu().numpy(), fast_map(backend.model, pixels).float().cpu().numpy()


MAP_RUNNERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "onnxruntime": _onnx, "openvino": _openvino, "executorch": _executorch, "coreml": _coreml, "torch": _torch}


def map_outputs(quality_model: QualityModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prepared input [N, ...] (`QualityModel.prepare`) -> (scores float32 [N], fast maps float32 [N, h, w]),
    both from one run; fixed-batch artifacts (ExecuTorch's batch 1) run in pieces."""
    backend = quality_model.backend
    runner = MAP_RUNNERS[backend.name]
    step = backend.fixed_batch or backend.max_batch or len(x)
    scores, maps = [], []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        n = len(chunk)
        if backend.fixed_batch and n < backend.fixed_batch:  # pad with copies of the last image, dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], backend.fixed_batch - n, axis=0)])
        score, score_map = runner(backend, chunk)
        scores.append(np.asarray(score, np.float32).reshape(-1)[:n])
        score_map = np.asarray(score_map, np.float32)
        maps.append(score_map.reshape(len(chunk), *score_map.shape[-2:])[:n])
    return np.concatenate(scores), np.concatenate(maps)


def predict_maps(quality_model: QualityModel, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC preprocessed pixels -> (scores [N], fast maps [N, h, w]), in batches."""
    parts = [map_outputs(quality_model, quality_model.prepare(np.asarray(images[i:i + batch_size])))
             for i in range(0, len(images), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- the two maps ---------------------------------------------------------------------------------------


def _open(image: ImageLike, draft_size: int | None) -> Image.Image:
    """The original image as RGB PIL (a path is opened with libjpeg's draft scaling down to `draft_size`)."""
    from kdiqa_edge.preprocess import image_from_array, to_rgb, upright_rgb

    if isinstance(image, (str, Path)):
        return open_image(image, draft_size)
    if isinstance(image, (bytes, bytearray, memoryview)):  # an image file's bytes, as score() takes them
        return open_image_bytes(bytes(image), draft_size)
    if isinstance(image, Image.Image):
        return upright_rgb(image)  # as score() sees it: EXIF orientation applied
    return to_rgb(image_from_array(np.asarray(image)))


def patch_boxes(box: tuple[float, float, float, float], grid: int = PATCH_GRID,
                fraction: float = PATCH_FRACTION) -> list[tuple[float, float, float, float]]:
    """The crops of the `patches` map, row by row: for each cell of a grid x grid division of `box`, a square
    `fraction` of the box's side centred on the cell, shifted inward to stay inside the box."""
    if grid < 1 or not 0 < fraction <= 1:
        raise ConfigError(f"patches need a grid of at least 1 and a crop fraction in (0, 1]; got {grid}, {fraction}")
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    side_x, side_y = fraction * width, fraction * height

    def start(origin: float, extent: float, side: float, index: int) -> float:
        centre = origin + (index + 0.5) * extent / grid
        return min(max(centre - side / 2, origin), origin + extent - side)

    return [(start(left, width, side_x, j), start(top, height, side_y, i),
             start(left, width, side_x, j) + side_x, start(top, height, side_y, i) + side_y)
            for i in range(grid) for j in range(grid)]


def quality_map(quality_model: QualityModel, image: ImageLike, kind: str = "fast", grid: int = PATCH_GRID,
                fraction: float = PATCH_FRACTION, photo: Image.Image | None = None,
                spec: PreprocessSpec | None = None) -> QualityMap:
    """The map of one image (a path, PIL image or HWC array), its global score and the region it covers.
    `photo`: the image already opened (the overlay's). `spec`: the model's preprocessing with another decode
    (`score --decode`). Raises ImageLoadError for an unreadable file, ConfigError for a kind the model cannot
    give (`check_kind`)."""
    check_kind(quality_model, kind)
    spec = spec or quality_model.preprocess
    if photo is None:
        photo = _open(image, _draft_size(spec, kind, fraction))
    score, values = _map_values(quality_model, image, kind, grid, fraction, photo, spec)
    return QualityMap(kind, score, values, region_of(photo, spec))


def region_of(photo: Image.Image, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """The model's centre crop of `photo` as fractions of its width and height: what a map covers."""
    left, top, right, bottom = crop_box(photo.width, photo.height, spec.size)[0]
    return left / photo.width, top / photo.height, right / photo.width, bottom / photo.height


def _draft_size(spec, kind: str, fraction: float = PATCH_FRACTION) -> int | None:
    """How far libjpeg may scale a JPEG down on decoding: the overlay's size, and for patches enough pixels
    that every crop holds at least the model's input size."""
    if not spec.draft:
        return None
    return max(OVERLAY_SIDE, math.ceil(spec.size / fraction) if kind == "patches" else 0)


def _map_values(quality_model: QualityModel, image: ImageLike, kind: str, grid: int, fraction: float,
                photo: Image.Image | None, spec: PreprocessSpec) -> tuple[float, np.ndarray]:
    # exactly what `score` feeds the model (with its --decode): the same global score
    pixels = load_preprocessed(image, spec) if isinstance(image, (str, Path)) else quality_model.load_image(image)
    if kind == "fast":
        scores, maps = map_outputs(quality_model, quality_model.prepare(pixels[None]))
        return float(scores[0]), maps[0]
    score = float(quality_model.predict(pixels[None])[0])
    if photo is None:
        photo = _open(image, _draft_size(spec, kind, fraction))
    crops = _patches(photo, spec, grid, fraction)
    return score, quality_model.predict(crops, batch_size=len(crops)).reshape(grid, grid).astype(np.float32)


def _patches(photo: Image.Image, spec, grid: int, fraction: float) -> np.ndarray:
    """uint8 [grid^2, S, S, 3]: each crop of `patch_boxes` resized to the model's input with the model's filter."""
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[spec.interpolation]
    box, _ = crop_box(photo.width, photo.height, spec.size)
    return np.stack([np.asarray(photo.resize((spec.size, spec.size), resample, box=crop), dtype=np.uint8)
                     for crop in patch_boxes(box, grid, fraction)])


def score_map(quality_model: QualityModel, image: ImageLike, kind: str = "fast") -> np.ndarray:
    """float32 [h, w]: the map of one image in score units (what `QualityModel.score_map` returns)."""
    check_kind(quality_model, kind)
    return _map_values(quality_model, image, kind, PATCH_GRID, PATCH_FRACTION, None, quality_model.preprocess)[1]


# --- overlays -------------------------------------------------------------------------------------------


def render_overlay(photo: Image.Image, result: QualityMap, path: Path, label: str = "") -> Path:
    """The region of `photo` the map covers, the map upsampled (bilinear) onto it in a red-yellow-green scale,
    a colour bar in score units 1..5 and the global score in the top-left corner, as a PNG at `path`.

    Drawn with Pillow: 45 ms an image, half of it the PNG's encoding; the matplotlib figure it replaced took
    185 ms (2-vCPU EPYC), a hundred times what a fast map of a small student costs, so `score --map` ran at the
    speed of its plots."""
    from PIL import ImageDraw

    from kdiqa_edge.io import atomic_path

    side, lut = OVERLAY_SIDE, _colour_table()
    left, top, right, bottom = result.region
    box = (left * photo.width, top * photo.height, right * photo.width, bottom * photo.height)
    region = np.asarray(photo.convert("RGB").resize((side, side), Image.Resampling.BICUBIC, box=box), np.float32)
    values = Image.fromarray(np.ascontiguousarray(result.values, np.float32), "F")
    upsampled = np.asarray(values.resize((side, side), Image.Resampling.BILINEAR))
    blended = region * (1 - OVERLAY_ALPHA) + lut[_lut_index(upsampled)] * OVERLAY_ALPHA
    canvas = Image.new("RGB", (round(side * 1.25), side), "white")
    canvas.paste(Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)))
    _colour_bar(canvas, lut)
    boxes = Image.new("RGBA", canvas.size, (0, 0, 0, 0))  # the text's white backgrounds, composited below
    draw, shade = ImageDraw.Draw(canvas), ImageDraw.Draw(boxes)
    texts = [((8, 8), f"score {result.score:.2f}", _font(17), 4, 217, "la")]
    if label:
        texts.append(((8, side - 8), label, _font(11), 2, 179, "ld"))
    for (x, y), text, font, pad, alpha, anchor in texts:
        x0, y0, x1, y1 = draw.textbbox((x + pad, y + pad if anchor == "la" else y - pad), text, font=font,
                                       anchor=anchor)
        shade.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), fill=(255, 255, 255, alpha))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), boxes).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for (x, y), text, font, pad, _, anchor in texts:
        draw.text((x + pad, y + pad if anchor == "la" else y - pad), text, fill="black", font=font, anchor=anchor)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # 25 ms; level 6: 110 ms, 20% smaller
    return path


def _colour_table() -> np.ndarray:
    """COLORMAP as 256 RGB rows (float32, 0..255), SCORE_RANGE[0] first."""
    from matplotlib import colormaps

    return (colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)


def _lut_index(values: np.ndarray) -> np.ndarray:
    low, high = SCORE_RANGE
    return np.rint(np.clip((values - low) / (high - low), 0.0, 1.0) * 255).astype(np.intp)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError):
        return ImageFont.load_default()


def _colour_bar(canvas: Image.Image, lut: np.ndarray) -> None:
    """The scale right of the photo: SCORE_RANGE top (5) to bottom (1), a tick and its number per score unit,
    and what the colours mean, written upwards."""
    from PIL import ImageDraw

    width, height = canvas.size
    x0, x1 = round(0.84 * width), round(0.88 * width)
    y0, y1 = round(0.08 * height), round(0.92 * height)
    low, high = SCORE_RANGE
    column = high - (high - low) * np.arange(y1 - y0) / max(y1 - y0 - 1, 1)
    strip = np.repeat(lut[_lut_index(column)][:, None, :], x1 - x0, axis=1)
    canvas.paste(Image.fromarray(strip.astype(np.uint8)), (x0, y0))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="black")
    for tick in range(math.ceil(low), math.floor(high) + 1):
        y = y0 + round((high - tick) / (high - low) * (y1 - y0 - 1))
        draw.line((x1, y, x1 + 4, y), fill="black")
        draw.text((x1 + 7, y), str(tick), fill="black", font=font, anchor="lm")
    title = "quality (1 bad .. 5 perfect)"
    size = draw.textbbox((0, 0), title, font=font, anchor="lt")
    text = Image.new("RGB", (size[2] + 2, size[3] + 2), "white")
    ImageDraw.Draw(text).text((1, 1), title, fill="black", font=font, anchor="lt")
    text = text.rotate(90, expand=True)
    canvas.paste(text, (x1 + 24, (y0 + y1 - text.height) // 2))


def _write_array(values: np.ndarray, path: Path) -> Path:
    from kdiqa_edge.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, values)
    return path


MAP_INDEX = "maps.csv"  # in a map folder: image,overlay,array per map written, what names it and whose it is


class MapWriter:
    """Writes each image's overlay (`NAME.map.png`) and raw map (`NAME.map.npy`) into `out`, and a line
    `image,overlay,array` into `out/maps.csv`. NAME is the image's stem; a stem another image holds in that
    folder, in this run or an earlier one (maps.csv says whose), gets -2, -3...: a map is never written over
    another image's, and an image scored again keeps its name. Two writers into one folder claim names under a
    lock on maps.csv, each reading what the other appended to it first. `decode`: the JPEG decoding of
    the score ("draft"/"exact"; default: the model's)."""

    def __init__(self, quality_model: QualityModel, out: str | Path, kind: str = "fast", decode: str | None = None):
        check_kind(quality_model, kind)
        self.quality_model, self.out, self.kind = quality_model, Path(out), kind
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--map {self.out} is a file: name a folder for the maps")
        self.spec = quality_model.preprocess.with_decode(decode) if decode else quality_model.preprocess
        self._owners: dict[str, str] = {}  # NAME -> the image (resolved path) it belongs to
        self._names: dict[str, str] = {}  # image -> NAME
        self._read = 0  # the bytes of maps.csv read so far: another writer's lines come after
        self._read_index()
        from kdiqa_edge.io import sweep_temporaries

        sweep_temporaries(self.out, unclaimed=())  # a killed run's half-written maps (never a live writer's)

    def _read_index(self) -> None:
        """What maps.csv says beyond what this writer read (all of it at first; then another writer's lines).
        Names go out as their bytes (surrogateescape), as `_claim` writes them."""
        import csv
        import io

        try:
            with open(self.out / MAP_INDEX, "rb") as handle:
                handle.seek(self._read)
                new = handle.read()
            text = new.decode("utf-8", errors="surrogateescape")
            rows = csv.reader(io.StringIO(text, newline=""))
            for row in rows:
                if len(row) == 3 and row[0] and row[2].endswith(".map.npy") and row != ["image", "overlay", "array"]:
                    name = Path(row[2]).name[:-len(".map.npy")]
                    self._owners[name], self._names[row[0]] = row[0], name
            self._read += len(new)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, csv.Error) as exc:
            raise ConfigError(f"{self.out / MAP_INDEX} cannot be read ({exc}): move it away, or pass another --map "
                              "folder") from None

    def mapped(self, path: str | Path) -> bool:
        """Whether maps.csv names a map of this image (in this folder) and both its files are there: a name is
        claimed before its files are written, so a kill (or Ctrl-C) between the two leaves a claim alone."""
        name = self._names.get(str(Path(path).resolve()))
        return name is not None and all((self.out / f"{name}.map.{end}").is_file() for end in ("npy", "png"))

    def _claim(self, path: Path) -> str:
        """The image's NAME: the one maps.csv gives it, else a free one, recorded in maps.csv under the lock
        (another writer's claims read first), so that two writers never take one name."""
        import csv
        import io

        from kdiqa_edge.data._lock import file_lock

        image = str(path.resolve())
        if image in self._names:
            return self._names[image]
        with file_lock(self.out / MAP_INDEX):  # created empty if new: the header goes first below
            self._read_index()
            if image in self._names:
                return self._names[image]
            name, count = path.stem, 1
            while name in self._owners or (self.out / f"{name}.map.npy").exists():  # no index names it: not ours
                count += 1
                name = f"{path.stem}-{count}"
            line = io.StringIO()
            writer = csv.writer(line, lineterminator="\n")
            if (self.out / MAP_INDEX).stat().st_size == 0:
                writer.writerow(["image", "overlay", "array"])
            writer.writerow([image, f"{name}.map.png", f"{name}.map.npy"])
            data = line.getvalue().encode("utf-8", errors="surrogateescape")
            with open(self.out / MAP_INDEX, "ab") as handle:
                handle.write(data)
            self._read += len(data)  # ours: not to be read back as another's
            self._owners[name], self._names[image] = image, name
        return name

    def claim(self, path: str | Path) -> str:
        """The image's NAME in this folder, claimed now (in maps.csv): for a `write` in another thread."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self._claim(Path(path))

    def write(self, path: str | Path, values: np.ndarray | None = None, score: float | None = None,
              name: str | None = None) -> MapRow:
        """One image's files; an image that cannot be read gives a row with its reason. `values` and `score`:
        its fast map and score from the scoring run (`score --map`: one run of the model gives both), else
        computed here. `name`: one `claim` gave; with it and `values`, a write touches neither the model nor
        the writer's names, so writes run in threads (`score --map` renders in its --workers)."""
        path = Path(path)
        try:
            photo = _open(path, _draft_size(self.spec, self.kind))
            if values is None:
                result = quality_map(self.quality_model, path, self.kind, photo=photo, spec=self.spec)
            else:
                result = QualityMap(self.kind, float(score), np.asarray(values, np.float32),
                                    region_of(photo, self.spec))
        except ImageLoadError as exc:
            return MapRow(str(path), error=exc.reason)
        self.out.mkdir(parents=True, exist_ok=True)
        name = name or self._claim(path)
        array = _write_array(result.values, self.out / f"{name}.map.npy")
        overlay = render_overlay(photo, result, self.out / f"{name}.map.png",
                                 label=f"{self.kind} map {result.values.shape[0]}x{result.values.shape[1]} "
                                       f"({result.values.min():.2f}..{result.values.max():.2f}), "
                                       f"{self.quality_model.info.path.name}")
        return MapRow(str(path), result.score, str(overlay), str(array), tuple(result.values.shape))


def write_maps(quality_model: QualityModel, files: Iterable[str | Path | tuple[Path, str | None]],
               out: str | Path, kind: str = "fast", decode: str | None = None) -> Iterator[MapRow]:
    """A row per file: its overlay and .npy written into `out`, or the reason it could not be (an unreadable
    image; an entry `runtime.files.ImageFiles` already gave a reason for, as (path, reason))."""
    writer = MapWriter(quality_model, out, kind, decode)
    for entry in files:
        path, problem = entry if isinstance(entry, tuple) else (entry, None)
        yield MapRow(str(path), error=problem) if problem is not None else writer.write(path)
