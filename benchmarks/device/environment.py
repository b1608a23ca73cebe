"""What a GPU check ran on: the GPU, torch, onnxruntime (which build, which providers, whether CUDA starts).

    python benchmarks/device/environment.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from kdiqa_edge.bench.environment import environment
    from kdiqa_edge.export.onnx import provider_problem

    cuda = torch.cuda.is_available()
    info = {**environment(),  # the machine, CPU, package versions, onnxruntime's providers, nvidia-smi's GPUs
            "torch_cuda": torch.version.cuda, "cuda_available": cuda, "bf16": cuda and torch.cuda.is_bf16_supported(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
            # two onnxruntime builds may be installed (the image's CPU one, the carried GPU one): the one imported
            "onnxruntime_imported": f"{ort.__version__} from {Path(ort.__file__).parent}",
            "cuda_provider_starts": provider_problem("CUDAExecutionProvider") is None,
            "cuda_provider_problem": provider_problem("CUDAExecutionProvider")}  # onnxruntime's reason, if any
    for name in ("timm", "open_clip", "onnx", "onnxslim"):  # likewise: what imports, the carried wheel or not
        try:
            info[f"{name}_imported"] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is what this reports
            info[f"{name}_imported"] = f"missing ({type(exc).__name__}: {exc})"
    print(json.dumps(info, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    main()
