"""The report of benchmarks/bench_int8.py: its rows, the markdown tables, the issue's checks and, where INT8
does not pay, which kernels cost more than FP32's (from ONNX Runtime's profiler)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

TEACHER = "ViT-B-32"
BOUND = 0.01  # the issue's drift bound, shown per candidate
SPEEDUP = 1.25  # "an INT8 recipe at least 1.25x faster than FP32"


@dataclasses.dataclass
class Row:
    """One timed artifact."""

    model: str
    name: str  # fp32, int8:<recipe>, plain fp32, plain int8, torch eager
    kind: str  # ours | plain | torch
    path: Path | None
    precision: str
    bytes: int = 0
    drift: dict = dataclasses.field(default_factory=dict)
    auto_latency: dict = dataclasses.field(default_factory=dict)  # auto's own b1/b8 measurement
    status: str = "ok"
    reason: str | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    profile: dict | None = None

    @property
    def p50(self) -> float:
        return float(np.median(self.times)) * 1e3 if self.times else float("nan")


def _families(profile: dict) -> dict[str, dict]:
    """Kernel time by operator family: QLinearConv, FusedConv and Conv are all Conv (the quantized kernel
    replaces the float one); Quantize/DequantizeLinear stay themselves (pure INT8 overhead)."""
    found: dict[str, dict] = {}
    for op in profile["ops"]:
        name = op["op"]
        for prefix in ("QLinear", "DynamicQuantize", "Fused", "Nhwc"):
            if name.startswith(prefix) and name not in ("QuantizeLinear", "DequantizeLinear"):
                name = name[len(prefix):]
        entry = found.setdefault(name, {"ms": 0.0, "count": 0})
        entry["ms"] += op["ms"]
        entry["count"] += op["count"]
    return found


def why_not_faster(mine: list[Row], fp32: Row) -> list[str]:
    """Where no INT8 recipe reaches SPEEDUP: the kernels the fastest INT8 spends more time in than FP32 does."""
    int8 = [r for r in mine if r.precision == "int8" and r.kind == "ours" and r.profile]
    best = min(int8, key=lambda r: r.p50, default=None)
    if best is None or fp32.profile is None or fp32.p50 / best.p50 >= SPEEDUP:
        return []
    before, after = _families(fp32.profile), _families(best.profile)
    grown = sorted(((after[op]["ms"] - before.get(op, {}).get("ms", 0.0), op) for op in after), reverse=True)
    parts = [f"{op} {before.get(op, {}).get('ms', 0.0):.2f} -> {after[op]['ms']:.2f} ms "
             f"({before.get(op, {}).get('count', 0)} -> {after[op]['count']} nodes)" for gain, op in grown[:4] if gain > 0]
    return [f"Why INT8 stops at {fp32.p50 / best.p50:.2f}x here ({best.name} vs fp32, kernel time per run): "
            f"{fp32.profile['total_ms']:.2f} -> {best.profile['total_ms']:.2f} ms in all; the kernels that cost "
            f"more in INT8: {'; '.join(parts)}.", ""]


def environment_lines(args, loads_before, loads) -> list[str]:
    import platform

    from kdiqa_edge.bench.environment import cpu_flags, cpu_info, versions

    cpu = cpu_info()
    isa_all = [f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4", "f16c", "vnni"))]
    wanted = ("onnxruntime", "onnx", "torch", "numpy")
    return [
        f"- CPU: {cpu['model']}, {cpu['cores']} logical cores, {platform.system()} {platform.release()} {cpu['machine']}",
        (f"- ISA flags that decide INT8 speed: **{' '.join(cpu['isa']) or 'unknown'}** "
        f"(no {', '.join(f for f in ('avx_vnni', 'avx_vnni_int8', 'amx_int8') if f not in cpu['isa'])})"),
        f"- all SIMD flags: {' '.join(isa_all)}",
        (f"- Threads: {args.threads} intra-op (ONNX Runtime; spin-waiting on, stopped when each run returns, in "
         f"every session), torch.set_num_threads({args.threads}); batch 1, 224 px"),
        f"- Versions: python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions().items() if k in wanted),
        (f"- Load average (1 min): {loads_before:.2f} at the start, {min(loads):.2f}-{max(loads):.2f} over the timed "
        f"rounds on {cpu['cores']} logical cores (where other jobs share the CPU, read the ratios, not the "
        "milliseconds)"),
        (f"- Timing: {args.rounds} rounds x {args.runs} runs per artifact (after one untimed run per turn), all "
        "artifacts of all models in each round, order reversed every other round; p50 of all runs"),
    ]


def _ms(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.2f}"


def model_section(model: str, rows: list[Row], pick: dict, eager: Row | None) -> list[str]:
    from kdiqa_edge.export import auto

    mine = [r for r in rows if r.model == model]
    fp32 = next(r for r in mine if r.name == "fp32")
    lines = [f"## {model}", "", ("| artifact | p50 ms @1 | vs our FP32 | img/s @8 (auto) | MB | ΔSRCC | mean \\|Δ\\| | "
             "max \\|Δ\\| | within 0.01 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in mine:
        if r.status != "ok":
            lines.append(f"| {r.name} | failed: {r.reason} | | | | | | | |")
            continue
        label = f"**{r.name}** (auto's pick)" if r.name == pick["pick"] else r.name
        d = r.drift
        b8 = r.auto_latency.get("8", {}).get("images_per_s")
        within = "ref" if r.name == "fp32" else ("yes" if r.name in pick["within_0.01"] else "no") \
            if r.kind == "ours" else ""
        lines.append(f"| {label} | {_ms(r.p50)} | {fp32.p50 / r.p50:.2f}x | {b8 if b8 else '—'} | "
                     f"{r.bytes / 1e6:.1f} | {d.get('delta_srcc', float('nan')):+.4f} | "
                     f"{d.get('mean_abs_diff_vs_fp32', float('nan')):.4f} | {d.get('max_abs_diff_vs_fp32', float('nan')):.4f} | "
                     f"{within} |" if d else f"| {label} | {_ms(r.p50)} | {fp32.p50 / r.p50:.2f}x | — | "
                     f"{r.bytes / 1e6:.1f} | | | | |")
    lines += ["", f"Auto (its own measurement, batch 1 and 8, {auto.ROUNDS} alternated rounds, then the close ones "
              f"head to head in {auto.RUNOFF_ROUNDS} rotated rounds): {pick['why']}", "", "```",
              *pick["table"], "```", ""]
    if pick.get("tuned"):
        t = pick["tuned"]
        lines += [f"Spin-waiting for the pick as shipped (the same file, two sessions, {t['runs']} runs each, "
                  f"alternated): off {t['p50_ms']['off']:.2f} ms, on {t['p50_ms']['on']:.2f} ms at batch {t['batch']} "
                  f"-> recorded `ort_spinning={t['value']}`.", ""]
    profiled = [r for r in mine if r.profile]
    if profiled:
        from kdiqa_edge.export.evaluate import profile_line

        lines += ["Kernels that ran (ONNX Runtime profiler, time share and node count, top 6):", ""]
        lines += [f"- {r.name}: {r.profile['total_ms']:.2f} ms of kernels: {profile_line(r.profile, 6)}" for r in profiled]
        lines.append("")
        lines += why_not_faster(mine, fp32)
    if eager is not None:
        lines += [(f"The teacher tower in torch eager: {eager.p50:.2f} ms at batch 1 ({eager.p50 / fp32.p50:.2f}x our "
                  "FP32 ONNX)."), ""]
    return lines


def summary(rows: list[Row], picks: dict[str, dict], eager: Row | None) -> tuple[list[str], dict]:
    lines = ["## Summary (batch 1, p50 ms, this CPU)", "",
             ("| model | our FP32 | best INT8 (recipe) | INT8 speed-up | auto's pick | pick / fastest candidate | "
             "plain FP32 | plain INT8 | pick / faster plain | teacher eager / pick |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    checks = {}
    for model, pick in picks.items():
        mine = [r for r in rows if r.model == model and r.status == "ok"]
        by = {r.name: r for r in mine}
        fp32 = by["fp32"]
        int8 = [r for r in mine if r.kind == "ours" and r.precision == "int8"]
        best = min(int8, key=lambda r: r.p50, default=None)
        shipped = by.get(pick["pick"], fp32)
        candidates = [r for r in mine if r.kind == "ours"]
        fastest = min(candidates, key=lambda r: r.p50)
        plain = [r for r in mine if r.kind == "plain"]
        faster_plain = min(plain, key=lambda r: r.p50) if plain else None
        plain_fp32 = by.get("plain fp32")
        plain_int8 = by.get("plain int8")
        teacher = f"{eager.p50 / shipped.p50:.1f}x" if eager is not None else "—"
        checks[model] = {"pick_vs_fastest": shipped.p50 / fastest.p50,
                         "pick_vs_faster_plain": shipped.p50 / faster_plain.p50 if faster_plain else None,
                         "best_int8_speedup": fp32.p50 / best.p50 if best else None,
                         "best_int8": best.name if best else None, "pick": shipped.name,
                         "declined": pick["declined"] is not None}
        lines.append(f"| {model} | {_ms(fp32.p50)} | {_ms(best.p50) if best else '—'} ({best.name if best else '—'}) | "
                     f"{fp32.p50 / best.p50:.2f}x | {shipped.name} {_ms(shipped.p50)} | "
                     f"{checks[model]['pick_vs_fastest']:.3f} | {_ms(plain_fp32.p50) if plain_fp32 else '—'} | "
                     f"{_ms(plain_int8.p50) if plain_int8 else '—'} | "
                     f"{checks[model]['pick_vs_faster_plain']:.3f} | {teacher} |")
    return lines + [""], checks


def done_when(checks: dict[str, dict], isa: str) -> list[str]:
    """The issue's "Done when" figures on this run; the two 1.05x ratios from the paired re-timing."""
    lines = [f"## The issue's checks on this CPU ({isa})", "",
             ("The ratios below are re-timed as pairs (30 rounds x 3 runs, the two alternated), which resolves "
             "two close artifacts where the round-robin over all of them cannot on a loaded machine; the INT8 "
             "speed-up pairs our FP32 with the INT8 the round-robin found fastest."), ""]
    for model, c in checks.items():
        fastest, plain = c["paired_pick_vs_fastest"], c["paired_pick_vs_faster_plain"]
        parts = [(f"auto ships {c['pick']}: the fastest candidate ({c['paired_fastest']}) is under --min-speedup, "
                  f"as the issue asks where no INT8 reaches {SPEEDUP}x" if c["declined"] else
                  f"pick / fastest candidate ({c['paired_fastest']}) {fastest:.3f} "
                  f"({'met' if fastest <= 1.05 else 'NOT met'}, <= 1.05)"),
                 (f"pick / faster plain export ({c['paired_faster_plain']}) {plain:.3f} "
                  f"({'met' if plain <= 1.05 else 'NOT met'}, <= 1.05)") if plain else "no plain export"]
        if model != TEACHER and c["paired_best_int8_speedup"]:
            speedup = c["paired_best_int8_speedup"]
            parts.append(f"best INT8 {c['paired_best_int8']} {speedup:.2f}x FP32 (round-robin "
                         f"{c['best_int8_speedup']:.2f}x; {'met' if speedup >= SPEEDUP else 'NOT met: see its kernels below'}"
                         f", >= {SPEEDUP}x)")
        lines.append(f"- {model}: " + "; ".join(parts))
    return [*lines, ""]
