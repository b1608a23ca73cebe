"""The `coreml` target: an ML Program `.mlpackage` (iPhone, Mac) from the traced (torch.export) score model.

The input is an `ImageType` (RGB, scale 1/255). ImageType takes one scalar scale, so CLIP's per-channel
mean/std is folded into the network (one Mul, one Add). Compute is FP16 (FP32 on request). `int8` is W8A8
(8-bit activations calibrated on train-split images, then 8-bit linear weights) where CoreML predictions run
(macOS, deployment target iOS17+), and weights-only W8 with FP16 activations elsewhere, said in the notes.
coremltools converts on Linux; predictions run on macOS only, so the parity check runs there and is reported
as skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError, ExportError, MissingDependency, first_line
from kdiqa_edge.export.base import Examples, ExportConfig, ExportResult, Supports, register_target

MAP_OUTPUT = "score_map"  # kdiqa_edge/models/maps.py (a torch module: not imported at module level)
# what the package takes: an image, as Core ML and Vision feed one (a CVPixelBuffer, CGImage or PIL image)
INPUT_NOTE = ("`image` is a Core ML image (ImageType: 8-bit RGB, any pixel buffer layout; scale 1/255 "
              "and CLIP's mean/std folded into the network): --input and --layout do not apply to Core ML")
EXTRA = "export"


def coremltools_missing() -> str | None:
    """None when coremltools imports, else why not. Its import logs warnings about the scikit-learn and torch
    versions it was not tested with, off macOS the native proxies it cannot load, and torch's pytree a
    deprecation: nothing a user acts on, held back (this runs before the export's output is captured)."""
    from kdiqa_edge.console import quiet_logger

    try:
        with quiet_logger("coremltools"), quiet_logger("torch.utils._pytree"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _image_model(model, cfg: ExportConfig):
    """[0, 1] RGB NCHW (what ImageType with scale 1/255 feeds) -> score, normalization folded in."""
    from torch import nn

    from kdiqa_edge.models.score import InputNorm, ScoreModel

    class ImageScoreModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.scored = ScoreModel(model, input="float", with_probs=cfg.with_probs, with_map=cfg.with_map)
            self.input_norm = InputNorm(model.preprocess, pixel_scale=1.0)

        def forward(self, x):
            return self.scored(self.input_norm(x))

    return ImageScoreModel().eval()


def output_names(cfg: ExportConfig) -> list[str]:
    return ["score", *(["probs"] * cfg.with_probs), *([MAP_OUTPUT] * cfg.with_map)]


def _register_missing_ops() -> None:
    """Torch ops coremltools 9 lacks a converter for. `alias` (torch.export emits it for views in timm's
    Swin) is an identity."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import (
        _TORCH_OPS_REGISTRY,
        register_torch_op,
    )

    if "alias" not in _TORCH_OPS_REGISTRY:
        @register_torch_op
        def alias(context, node):
            context.add(mb.identity(x=_get_inputs(context, node, expected=1)[0], name=node.name))


def _window_partition(x, window_size):
    """timm's Swin window_partition with the batch folded into the first axis: rank-5 views only."""
    B, H, W, C = x.shape
    x = x.reshape(B * (H // window_size[0]), window_size[0], W // window_size[1], window_size[1], C)
    return x.permute(0, 2, 1, 3, 4).reshape(-1, window_size[0], window_size[1], C)


def _window_reverse(windows, window_size, H: int, W: int):
    """timm's Swin window_reverse through rank-5 views."""
    C = windows.shape[-1]
    x = windows.reshape(-1, W // window_size[1], window_size[0], window_size[1], C)  # [B*H/wh, W/ww, wh, ww, C]
    return x.permute(0, 2, 1, 3, 4).reshape(-1, H, W, C)


def _patch_merging_forward(self, x):
    """timm's Swin PatchMerging.forward (2x2 neighbourhood -> channels) through rank-5 views."""
    from torch import nn

    B, H, W, C = x.shape
    x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = x.shape
    x = x.reshape(B * (H // 2), 2, W // 2, 2, C).permute(0, 2, 3, 1, 4).reshape(B, H // 2, W // 2, 4 * C)
    return self.reduction(self.norm(x))


@contextlib.contextmanager
def rank5_swin():
    """Core ML allows tensors of rank <= 5, and timm's Swin partitions windows (and merges patches) through
    rank-6 views. For the length of a trace, the same rearrangements with the batch folded into the first
    axis: identical numbers, rank 5 at most."""
    try:
        from timm.models import swin_transformer as swin
    except ImportError:
        yield
        return
    saved = swin.window_partition, swin.window_reverse, swin.PatchMerging.forward
    swin.window_partition, swin.window_reverse = _window_partition, _window_reverse
    swin.PatchMerging.forward = _patch_merging_forward
    try:
        yield
    finally:
        swin.window_partition, swin.window_reverse, swin.PatchMerging.forward = saved


def _traced_graphs(wrapped, size: int, cfg: ExportConfig):
    """The traced model, twice over: torch.export first (jit.trace graphs of open_clip's ViT hit
    coremltools 9's `int` cast bug under torch 2.14), then jit.trace (torch.export keeps ops such as the
    antialiased bicubic resize of timm's ViT position embeddings that coremltools cannot convert)."""
    import torch

    from kdiqa_edge.models.score import plain_attention

    def exported():
        batch_dim = torch.export.Dim("batch", min=1, max=max(cfg.max_batch, 2))
        with torch.no_grad(), warnings.catch_warnings(), plain_attention(), rank5_swin():
            warnings.simplefilter("ignore")
            return torch.export.export(wrapped, (torch.rand(2, 3, size, size),),
                                       dynamic_shapes=({0: batch_dim},)).run_decompositions({})

    def jit_traced():
        with torch.no_grad(), warnings.catch_warnings(), plain_attention(), rank5_swin():
            warnings.simplefilter("ignore")
            return torch.jit.trace(wrapped, torch.rand(1, 3, size, size))

    return (("torch.export", exported), ("jit.trace", jit_traced))


def activation_quantization(cfg: ExportConfig) -> str | None:
    """None when `int8` can quantize activations too (W8A8), else why it stays weights-only (W8)."""
    import coremltools as ct

    if sys.platform != "darwin":
        return (f"W8A8 calibrates activations with CoreML predictions, which run on macOS only (this is "
                f"{sys.platform}): weights-only int8 (W8), FP16 activations")
    if getattr(ct.target, cfg.coreml_target) < ct.target.iOS17:
        return (f"W8A8 needs a deployment target of iOS17 or later (this is {cfg.coreml_target}): "
                "weights-only int8 (W8)")
    return None


def float_weights(mlmodel, model, stem: str = "float") -> list[str]:
    """The program's constants that int8 leaves in float, as every other target does: the folded head's anchor
    matrix (a per-channel int8 grid over its 5 rows rounds the small differences between the quality levels
    away) and the projection feeding it, found by value, so either trace's naming of them does; with `stem`
    "float" (--int8-stem), the stem's conv too: the conv that reads the 3 RGB channels (coremltools folds the
    stem's batch norm into it, so it is found by shape, not by value)."""
    import numpy as np
    from coremltools.optimize.coreml import get_weights_metadata

    from kdiqa_edge.models.score import folded_weight, has_quality_head

    wanted = [folded_weight(model.head)[0].numpy()] if has_quality_head(model) else []
    for module in (getattr(model, "proj", None), None if has_quality_head(model) else getattr(model, "head", None)):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            wanted.append(weight.detach().float().numpy())

    def wanted_here(value: np.ndarray) -> bool:  # FP16 in the program: equal within its rounding
        candidates = (w for weight in wanted for w in (weight, weight.T) if w.shape == value.shape)
        return value.ndim == 2 and any(np.allclose(value.astype(np.float32), w, rtol=1e-2, atol=1e-3)
                                       for w in candidates)

    def stem_here(value: np.ndarray) -> bool:  # [out, 3, kh, kw]: a conv over the image's channels
        return stem == "float" and value.ndim == 4 and value.shape[1] == 3

    return [name for name, weight in get_weights_metadata(mlmodel, weight_threshold=0).items()
            if wanted_here(np.asarray(weight.val)) or stem_here(np.asarray(weight.val))]


def quantize_int8(mlmodel, calib, activations: str | None, keep_float: list[str] = ()):
    """8-bit linear symmetric weights, but for the constants named in `keep_float`; with `activations` None,
    8-bit activations first, calibrated on the `calib` images (uint8 HWC, the model's input size) through
    CoreML predictions: W8A8."""
    import coremltools.optimize.coreml as cto

    if activations is None:
        from PIL import Image

        if len(calib) == 0:
            raise ConfigError("CoreML W8A8 needs calibration images, and the train split gave none")
        config = cto.OptimizationConfig(
            global_config=cto.experimental.OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
        mlmodel = cto.experimental.linear_quantize_activations(
            mlmodel, config, [{"image": Image.fromarray(img)} for img in calib])
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"),
                                    op_name_configs=dict.fromkeys(keep_float))
    return cto.linear_quantize_weights(mlmodel, config=config)


def deployment_target(cfg: ExportConfig):
    """coremltools' target for `cfg.coreml_target` (a profile's), or a one-line refusal."""
    import coremltools as ct

    if cfg.coreml_target not in ct.target.__members__:
        raise ConfigError(f"unknown CoreML deployment target {cfg.coreml_target!r} (e.g. iOS16, macOS13)")
    return ct.target[cfg.coreml_target]


def convert(model, cfg: ExportConfig, meta: dict[str, Any], calib=None):
    """The MLModel (not yet saved) for `model` at `cfg.precision`; `calib` (uint8 HWC images from the train
    split) calibrates W8A8 int8 where CoreML predictions run."""
    import coremltools as ct

    _register_missing_ops()
    wrapped = _image_model(model, cfg)
    size = model.preprocess.size
    target = deployment_target(cfg)
    batch = ct.RangeDim(lower_bound=1, upper_bound=max(cfg.max_batch, 2), default=1)
    outputs = [ct.TensorType(name=name) for name in output_names(cfg)]
    failures = []
    for how, trace in _traced_graphs(wrapped, size, cfg):
        try:
            mlmodel = ct.convert(
                trace(),
                inputs=[ct.ImageType(name="image", shape=(batch, 3, size, size), scale=1 / 255.0,
                                     color_layout=ct.colorlayout.RGB)],
                outputs=outputs,
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT32 if cfg.precision == "fp32" else ct.precision.FLOAT16,
                minimum_deployment_target=target,
            )
            break
        except Exception as exc:  # noqa: BLE001 - coremltools raises many types for an op or shape it cannot convert
            failures.append(f"{how}: {first_line(exc, typed=True)}")
    else:
        arch = meta.get("source", {}).get("arch", "this model") if isinstance(meta.get("source"), dict) else "model"
        raise ExportError(f"coremltools cannot convert {arch} ({'; '.join(failures)})")
    if cfg.precision == "int8":
        mlmodel = quantize_int8(mlmodel, calib if calib is not None else [], activations=activation_quantization(cfg),
                                keep_float=float_weights(mlmodel, model, cfg.int8_stem))

    from kdiqa_edge import artifact

    mlmodel.user_defined_metadata.update(artifact.encode(meta))
    mlmodel.short_description = "Blind image quality score in [1, 5] (higher is better), kdiqa-edge"
    mlmodel.input_description["image"] = f"RGB image, {size}x{size}, resized (shorter side) and centre-cropped"
    mlmodel.output_description["score"] = "quality score, 1 (bad) .. 5 (perfect)"
    if cfg.with_map:
        mlmodel.output_description[MAP_OUTPUT] = ("local quality map [N, h, w], score units: the head at each "
                                                  "position of the final feature map")
    return mlmodel


def canonical_mlpackage(path: Path) -> Path:
    """Make a saved .mlpackage a function of its content (coremltools 9 writes the same model in new bytes
    each time): the spec re-serialized deterministically (protobuf maps, e.g. the metadata and MIL
    attributes, come out in an order of the process), and Manifest.json's item identifiers derived from the
    items' paths instead of fresh uuid4s."""
    import json
    import uuid

    from coremltools.proto import Model_pb2

    manifest_file = path / "Manifest.json"
    manifest = json.loads(manifest_file.read_text())
    identifiers = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"kdiqa-edge:mlpackage/{item['path']}"))
                   for old, item in manifest["itemInfoEntries"].items()}
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    spec_file = path / "Data" / root["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    manifest["itemInfoEntries"] = {identifiers[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = identifiers[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    return path


def describe(path: Path) -> dict[str, Any]:
    """Inputs, outputs and metadata of a saved .mlpackage (works on Linux: reads the spec only)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return {
        "inputs": {i.name: i.type.WhichOneof("Type") for i in spec.description.input},
        "outputs": [o.name for o in spec.description.output],
        "metadata": dict(spec.description.metadata.userDefined),
        "program": spec.WhichOneof("Type"),
    }


@register_target
class CoreMLTarget:
    """iPhone / Mac: ML Program with FP16 compute; int8 = W8A8 on macOS (iOS17+ target), weights-only elsewhere."""

    name = "coreml"
    supports = Supports(precisions=("fp32", "fp16", "int8"), dynamic_batch=True,
                        tolerance={"fp32": 1e-3, "fp16": 5e-2})

    def preflight(self, cfg: ExportConfig) -> None:
        """Fail before any work when coremltools is missing."""
        missing = coremltools_missing()
        if missing is not None:
            raise MissingDependency(f"the coreml target needs coremltools ({missing}); install it with: "
                                    f"pip install 'kdiqa-edge[{EXTRA}]'")
        deployment_target(cfg)  # a profile's unknown coreml_target: before any work, not after the data
        if cfg.precision == "int8" and cfg.calib_method != "minmax":
            raise ConfigError(f"--calib-method {cfg.calib_method}: coremltools calibrates int8 activations "
                              "its own way (and off macOS quantizes weights only); leave --calib-method out")

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        size = model.preprocess.size
        meta = {**meta, "target": self.name, "precision": cfg.precision,
                "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "size": size, "normalized": False,
                          "kind": "image"},
                "outputs": output_names(cfg)}
        path = out / f"model.{cfg.precision}.mlpackage"
        mlmodel = convert(model, cfg, meta, calib=examples.calib)
        mlmodel.save(str(path))
        canonical_mlpackage(path)  # two exports of one checkpoint: the same bytes
        info = describe(path)
        if info["program"] != "mlProgram" or info["outputs"] != meta["outputs"] or info["inputs"].get("image") != "imageType":
            raise ExportError(f"{path.name}: unexpected CoreML interface {info['inputs']} -> {info['outputs']}")
        result = ExportResult(target=self.name, precision=cfg.precision, files=[path],
                              extra={"input": meta["input"], "outputs": meta["outputs"],
                                     "compute_precision": "fp32" if cfg.precision == "fp32" else "fp16",
                                     "weights": "int8 linear symmetric" if cfg.precision == "int8" else cfg.precision,
                                     "deployment_target": cfg.coreml_target})
        if cfg.precision == "int8":
            weights_only = activation_quantization(cfg)
            result.extra["activations"] = "fp16" if weights_only else "int8 linear symmetric"
            result.extra["calibration_images"] = 0 if weights_only else len(examples.calib)
            if weights_only:
                result.notes.append(f"{path.name}: {weights_only}")
        # Core ML's own image input, whatever --input/--layout say (the CLI refuses an explicit --input float)
        result.notes.append(f"{path.name}: input {INPUT_NOTE}")
        result.parity = self._parity(model, mlmodel, examples, cfg.precision)
        if result.parity.get("skipped"):
            result.notes.append(f"{path.name}: {result.parity['skipped']}")
        if cfg.with_map:
            result.extra["map"] = self._map_parity(model, mlmodel, examples, cfg.precision)
            if "max_abs_diff" in result.extra["map"]["parity"]:
                from kdiqa_edge.export.evaluate import map_notes

                result.notes.extend(map_notes(result.extra["map"], path.name))
        return result

    def _map_parity(self, model, mlmodel, examples: Examples, precision: str) -> dict[str, Any]:
        """The `score_map` output vs torch's map, like the score's parity (macOS only: predictions run there)."""
        from kdiqa_edge.models.maps import grid_shape

        report: dict[str, Any] = {"output": MAP_OUTPUT, "kind": "fast", "shape": list(grid_shape(model))}
        if sys.platform != "darwin":
            report["parity"] = {"skipped": f"CoreML predictions run on macOS only (this is {sys.platform}): not "
                                           "checked here"}
            return report
        import numpy as np
        from PIL import Image

        from kdiqa_edge.export import evaluate

        maps = np.stack([np.asarray(mlmodel.predict({"image": Image.fromarray(img)})[MAP_OUTPUT]).reshape(report["shape"])
                         for img in examples.parity]).astype(np.float64)
        tolerance = self.supports.tolerance.get(precision)
        report["range"] = [float(maps.min()), float(maps.max())]
        report["parity"] = {**evaluate.parity(evaluate.torch_maps(model, examples.parity).reshape(-1),
                                              maps.reshape(-1), tolerance), "values": int(maps.size)}
        if report["parity"].get("passed") is False:
            raise ExportError(f"CoreML {MAP_OUTPUT} parity failed: max |map - torch map| = "
                              f"{report['parity']['max_abs_diff']:.2e}")
        return report

    def _parity(self, model, mlmodel, examples: Examples, precision: str) -> dict[str, Any]:
        if sys.platform != "darwin":
            return {"skipped": f"CoreML predictions run on macOS only (this is {sys.platform}): not checked here"}
        import numpy as np
        from PIL import Image

        from kdiqa_edge.export import evaluate
        from kdiqa_edge.export.evaluate import torch_reference

        scores = np.array([float(np.asarray(mlmodel.predict({"image": Image.fromarray(img)})["score"]).reshape(-1)[0])
                           for img in examples.parity])
        report = evaluate.parity(torch_reference(model, examples.parity), scores, self.supports.tolerance.get(precision))
        if report.get("passed") is False:
            raise ExportError(f"CoreML parity failed: max |score - torch score| = {report['max_abs_diff']:.2e}")
        return report
