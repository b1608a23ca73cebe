"""INT8 vs FP32 depthwise convs on ONNX Runtime, by channel count: which MLAS kernel the INT8 one gets.

    python benchmarks/bench_depthwise.py [--channels 88 96 104 112] [--threads 1 2] [--rounds 30]
                                         [--out benchmarks/results/depthwise-<machine>.md]

ONNX Runtime runs an INT8 depthwise conv with int8 weights of zero point 0 (quantize_static's default) on
MLAS's symmetric ConvSym kernel, which has AVX2, AVX-512 and VNNI forms, when the channel count is a multiple
of 16; any other count takes MLAS's generic INT8 depthwise kernel, which is AVX2-only. FP32 depthwise convs
take the NCHWc AVX-512 path on an AVX-512 CPU. This times a chain of 8 depthwise 3x3 convs (+ ReLU) at
56x56, FP32 and INT8 (QDQ, U8S8, per-channel), for each channel count, every model once per round with the
order reversed every other round; medians, and the INT8/FP32 ratio per channel count. The chain amortizes
the one Q/DQ pair and layout change at its ends. kdiqa_edge/export/recipes.py cites these figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import alternated, emit  # benchmarks/ is on sys.path (above)

SIZE = 56
DEPTH = 8


def chain(channels: int):
    import torch

    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def build(channels: int, folder: Path) -> tuple[Path, Path]:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32, int8 = folder / f"dw{channels}.fp32.onnx", folder / f"dw{channels}.int8.onnx"
    torch.manual_seed(0)
    torch.onnx.export(chain(channels), torch.rand(1, channels, SIZE, SIZE), str(fp32), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.random((1, channels, SIZE, SIZE), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[88, 96, 104, 112])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model per round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import logging

    import onnxruntime as ort

    from kdiqa_edge.bench.environment import cpu_line, machine_slug
    from kdiqa_edge.export import evaluate

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-dw-") as scratch:
        models = {}
        for c in args.channels:
            fp32, int8 = build(c, Path(scratch))
            for n in args.threads:
                # spin-waiting stopped when each run returns: many sessions side by side
                models[(c, n, "fp32")] = evaluate.session(fp32, n, stop_spinning=True)
                models[(c, n, "int8")] = evaluate.session(int8, n, stop_spinning=True)
        inputs = {c: np.random.default_rng(1).random((1, c, SIZE, SIZE), np.float32) for c in args.channels}
        calls = {key: (lambda s=session, f={"x": inputs[key[0]]}: s.run(None, f)) for key, session in models.items()}
        times, loads = alternated(calls, args.rounds, args.runs)
        load.append(loads[-1])
    p50 = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    command = " ".join(["python benchmarks/bench_depthwise.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# INT8 vs FP32 depthwise convs on ONNX Runtime, by channel count ({machine_slug()})", "",
             f"`{command}`: {DEPTH} depthwise 3x3 convs + ReLU "
             f"at {SIZE}x{SIZE}, batch 1, median of {args.rounds} alternated rounds x {args.runs} runs.", "",
             f"{cpu_line()}; onnxruntime {ort.__version__}; load average "
             f"{load[0]:.2f} before, {load[1]:.2f} after.", "",
             "| threads | channels | multiple of 16 | FP32 ms | INT8 ms | INT8 / FP32 time |",
             "|---|---|---|---|---|---|"]
    for n in args.threads:
        for c in args.channels:
            f, q = p50[(c, n, "fp32")], p50[(c, n, "int8")]
            lines.append(f"| {n} | {c} | {'yes' if c % 16 == 0 else 'no'} | {f:.3f} | {q:.3f} | {q / f:.2f} |")
    lines += ["", "Multiples of 16 take MLAS's ConvSym depthwise kernel (AVX-512 VNNI where the CPU has it); "
              "other counts take the generic INT8 depthwise kernel, which is AVX2-only."]
    emit("\n".join(lines) + "\n", args.out)
    return p50


if __name__ == "__main__":
    main()
