"""`QualityModel`: load any kdiqa-edge artifact and score images with numpy + PIL (no torch).

    from kdiqa_edge import QualityModel
    model = QualityModel.load("student.onnx")
    model.score("photo.jpg")             # -> float in [1, 5]
    model.score(["a.jpg", "b.png"])      # -> float32 [2]
    model.score(pil_image)               # any mode, any size
    model.score(open("a.jpg", "rb").read())   # an image file's bytes (an upload)
    for result in model.score_files(paths):   # decoded in parallel; unreadable files reported, not raised
        print(result.path, result.score, result.error)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.preprocess import (
    ImageLoadError,
    PreprocessSpec,
    image_from_array,
    load_preprocessed,
    normalize,
    open_image_bytes,
    preprocess_pil,
    resize_crop,
)
from kdiqa_edge.runtime.base import Backend, load_backend
from kdiqa_edge.runtime.info import ArtifactInfo
from kdiqa_edge.runtime.pipeline import (
    ScoreResult,
    decode_files,
    default_workers,
    preprocessed,
    score_paths,
    walk,
)

__all__ = ["ImageLike", "QualityModel", "ScoreResult"]

ImageLike = str | Path | Image.Image | np.ndarray | bytes


class QualityModel:
    """A loaded artifact plus the preprocessing its metadata prescribes."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.info: ArtifactInfo = backend.info
        self.preprocess: PreprocessSpec = backend.info.preprocess
        self._float_input = self.info.input.dtype.startswith("float")
        self._nchw = self.info.input.layout.upper() == "NCHW"
        self._input_dtype = np.float16 if self.info.input.dtype == "float16" else np.float32

    @property
    def notes(self) -> list[str]:
        """What the backend had to settle for, one line each: a provider that did not start at load, or one
        that failed on a run since."""
        return list(getattr(self.backend, "notes", ()))

    @classmethod
    def load(cls, path: str | Path, provider: str | None = None, threads: int | None = None,
             spinning: bool | None = None, stop_spinning: bool = False) -> QualityModel:
        """Open an .onnx, .engine/.plan, .mlpackage, .pte (ExecuTorch), .xml (OpenVINO), checkpoint dir or run dir,
        or a registered version in MLflow's model registry (`models:/NAME/VERSION`, `/latest`, `@ALIAS`).

        provider: onnxruntime execution provider (cpu, cuda, tensorrt, coreml, or a full name; default the
        best available), "cuda"/"cpu" for a checkpoint, compute units (cpu, gpu, ane) for CoreML.
        threads: CPU threads (ONNX Runtime intra-op, ExecuTorch's process-wide pool, torch).
        spinning: ONNX Runtime's intra-op spin-waiting; None: as the artifact records (auto measures it), else on.
        stop_spinning: ONNX Runtime's workers stop spinning when each run returns (for timing several models
        side by side in one process; a served model keeps ORT's default, which spins on between runs).
        """
        from kdiqa_edge.runtime.registry_uri import is_registry_uri, resolve_model_uri

        if is_registry_uri(path):  # a version in MLflow's model registry
            path = resolve_model_uri(str(path))
        return cls(load_backend(path, provider=provider, threads=threads, spinning=spinning,
                                stop_spinning=stop_spinning))

    def __repr__(self) -> str:
        untrained = ", not pretrained (random init)" if self.info.pretrained is False else ""
        return (f"QualityModel({self.info.path.name}, {self.backend.name}/{self.backend.device}, "
                f"{self.info.precision}, input {self.info.input.dtype} {self.info.input.layout} {self.info.input.size}"
                f"{untrained})")

    # --- arrays ------------------------------------------------------------------------------------

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC (preprocessed pixels) -> the artifact's input array (dtype, layout, normalization)."""
        if self._float_input:
            x = normalize(images, self.preprocess)  # float32 NCHW
            if not self._nchw:
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            return x if self._input_dtype is np.float32 else x.astype(self._input_dtype)
        return np.ascontiguousarray(images if not self._nchw else images.transpose(0, 3, 1, 2))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Prepared input [N, ...] -> scores float32 [N]. Splits (and pads) for fixed- or bounded-batch artifacts."""
        fixed, most = self.backend.fixed_batch, self.backend.max_batch
        if (fixed is None or len(x) == fixed) and (most is None or len(x) <= most):
            return self.backend.run(x)
        step = fixed or most
        scores = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if fixed and n < fixed:  # pad the tail with copies of its last image; their scores are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
            scores.append(self.backend.run(chunk)[:n])
        return np.concatenate(scores).astype(np.float32)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 NHWC preprocessed pixels [N, S, S, 3] -> scores float32 [N], in batches."""
        size = self.preprocess.size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise ConfigError(f"predict() takes uint8 [N, {size}, {size}, 3] (the model's preprocessed pixels; "
                              f"score() takes images of any size), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if len(images) == 0:
            return np.zeros(0, np.float32)
        return np.concatenate([self.run(self.prepare(np.asarray(images[i:i + batch_size])))
                               for i in range(0, len(images), batch_size)])

    # --- images ------------------------------------------------------------------------------------

    def load_image(self, image: ImageLike) -> np.ndarray:
        """One path / PIL image / HWC array / image file's bytes -> preprocessed uint8 [S, S, 3] (raises
        ImageLoadError)."""
        if isinstance(image, (str, Path)):
            return load_preprocessed(image, self.preprocess)
        if isinstance(image, (bytes, bytearray, memoryview)):  # decoded as the same file on disk would be
            spec = self.preprocess
            return resize_crop(open_image_bytes(bytes(image), spec.size if spec.draft else None), spec)
        if isinstance(image, Image.Image):
            return preprocess_pil(image, self.preprocess)
        if isinstance(image, np.ndarray):
            return preprocess_pil(image_from_array(image), self.preprocess)
        raise ConfigError(f"cannot score a {type(image).__name__}: pass a path, an image file's bytes, a PIL "
                          "image or a numpy array (HWC)")

    def score(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32):
        """A path, image file's bytes, PIL image or HWC array -> float; a list of them or an NHWC array ->
        float32 [N].

        Raises ImageLoadError for an unreadable file; use `score_files` to carry on past bad files.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype == np.uint8 and images.shape[1:3] == (self.preprocess.size,) * 2:
                return self.predict(images, batch_size)  # already the model's pixels
            images = list(images)
        if isinstance(images, (str, Path, Image.Image, np.ndarray, bytes, bytearray, memoryview)):
            return float(self.predict(self.load_image(images)[None])[0])
        images = list(images)  # a generator or any other iterable of images
        if len(images) > 1 and all(isinstance(image, (str, Path)) for image in images):
            pixels = self._decode_paths(images)  # in parallel, as score_files
        else:
            pixels = np.stack([self.load_image(image) for image in images]) if len(images) else None
        return self.predict(pixels, batch_size) if pixels is not None else np.zeros(0, np.float32)

    def _decode_paths(self, paths: Sequence[str | Path]) -> np.ndarray:
        pixels = []
        for item in decode_files(walk(paths), preprocessed(self.preprocess), default_workers()):
            if item.pixels is None:
                raise ImageLoadError(item.error, item.path)
            pixels.append(item.pixels)
        return np.stack(pixels)

    def score_files(self, paths: Iterable[str | Path], batch_size: int = 32, workers: int | None = None,
                    decode: str | None = None) -> Iterator[ScoreResult]:
        """Score files in batches, in their order; an unreadable file yields a result with its error and no score.
        A folder among `paths` is searched recursively as `kdiqa-edge score` searches it (its image files in
        name order; an entry that cannot be read, a dangling symlink..., a result with its reason).

        Files decode in `workers` threads (default: the cores; `runtime.pipeline`) while the model runs. An
        ONNX model for this is best loaded with `spinning=False`, as `kdiqa-edge score` does: its workers then
        leave the cores to the decoders between runs.
        decode: "draft" or "exact" JPEG decoding (default: as the model's preprocessing records, what its
        training cache used).
        """
        if isinstance(paths, (str, Path)):  # one path, not its characters
            paths = [paths]
        for _, result in score_paths(self, _files(paths), batch_size, workers=workers, decode=decode):
            yield result

    def score_map(self, image: ImageLike, kind: str = "fast") -> np.ndarray:
        """The local quality map of one image, float32 [h, w] in score units over the centre crop the model sees:
        `fast` (the artifact's score_map output: export --with-map; a checkpoint has it too) or `patches` (the
        model on a 4x4 grid of overlapping crops; any artifact). See kdiqa_edge/runtime/maps.py."""
        from kdiqa_edge.runtime.maps import score_map

        return score_map(self, image, kind)


def _files(paths: Iterable[str | Path]) -> Iterator[tuple[str | Path, str | None]]:
    """`found` entries of `paths`: a file to be tried, a folder's image files (`runtime.files.ImageFiles`)."""
    from kdiqa_edge.runtime.files import ImageFiles

    for path in paths:
        if Path(path).is_dir():
            yield from ImageFiles([path])
        else:
            yield str(path), None
