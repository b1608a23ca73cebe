"""Test artifacts for the runtime and bench tests: a tiny torch score model exported to ONNX with the
`kdiqa_edge.*` metadata of artifact.py, plus real photos from scikit-image (fixtures may use torch)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from kdiqa_edge import artifact
from kdiqa_edge.preprocess import PreprocessSpec

SIZE = 64
SPEC = PreprocessSpec(size=SIZE)


def tiny_score_model(seed: int = 0, uint8_nhwc: bool = False):
    """conv encoder + L2 norm + folded quality head, the ScoreModel graph shape of ARCHITECTURE.md."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16))
            self.register_buffer("weight", 14.3 * nn.functional.normalize(torch.randn(5, 16), dim=-1))
            self.register_buffer("levels", torch.arange(1, 6, dtype=torch.float32))
            self.register_buffer("mean", torch.tensor(SPEC.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(SPEC.std).view(1, 3, 1, 1))

        def forward(self, image):
            if uint8_nhwc:
                image = (image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            u = nn.functional.normalize(self.encoder(image), dim=-1)
            probs = torch.softmax(u @ self.weight.t(), dim=-1)
            return (probs * self.levels).sum(-1)

    return Tiny().eval()


def export_tiny_onnx(path: Path, seed: int = 0, uint8_nhwc: bool = False, precision: str = "fp32",
                     fixed_batch: int | None = None, metadata: bool = True) -> Path:
    import torch

    from kdiqa_edge.export.onnx import set_metadata

    model = tiny_score_model(seed, uint8_nhwc)
    batch = fixed_batch or 2
    if uint8_nhwc:
        example = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8)
    else:
        example = torch.randn(batch, 3, SIZE, SIZE)
    path = Path(path)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["score"],
                          dynamic_axes=None if fixed_batch else {"image": {0: "batch"}, "score": {0: "batch"}},
                          opset_version=17, dynamo=False)
    if metadata:
        meta = {
            "format": artifact.FORMAT_VERSION, "preprocess": SPEC.to_dict(),
            "input": {"name": "image", "dtype": "uint8" if uint8_nhwc else "float32",
                      "layout": "NHWC" if uint8_nhwc else "NCHW", "size": SIZE, "normalized": not uint8_nhwc},
            "outputs": ["score"], "score_range": [1, 5], "prompts": [f"a photo of {q} quality" for q in
                                                                     ("bad", "poor", "fair", "good", "perfect")],
            "source": {"kind": "student", "arch": "tiny", "checkpoint_hash": "test", "pretrained": False,
                       "variant": "full"},
            "precision": precision, "target": "onnx", "versions": {"torch": torch.__version__},
        }
        set_metadata(path, meta)
    return path


def quantize_dynamic_int8(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    proto = onnx.load(str(dst))
    for entry in proto.metadata_props:
        if entry.key == artifact.PREFIX + "precision":
            entry.value = "int8"
    onnx.save(proto, str(dst))
    return dst


def real_photos(folder: Path) -> list[Path]:
    """Photos shipped with scikit-image, as JPEG and PNG files in `folder` (one 1024x768 JPEG for draft mode)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field"):
        image = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        for ext in ("jpg", "png"):
            path = folder / f"{name}.{ext}"
            image.save(path, quality=92) if ext == "jpg" else image.save(path)
            out.append(path)
    big = Image.fromarray(np.asarray(data.astronaut())).resize((1024, 768), Image.Resampling.BICUBIC)
    big.save(folder / "astronaut_1024x768.jpg", quality=92)
    out.append(folder / "astronaut_1024x768.jpg")
    return out


def noise_jpegs(folder: Path, count: int) -> Path:
    """`count` small noise JPEGs, p00.jpg.. (48x64): quick to score in process."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"p{index:02d}.jpg")
    return folder
