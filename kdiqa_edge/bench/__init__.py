"""Benchmark harness: latency, model facts, accuracy and drift across formats (torch-free)."""

from kdiqa_edge.bench.latency import LatencyStats, PreprocessStats, time_inference, time_preprocessing
from kdiqa_edge.bench.runner import BenchConfig, BenchReport, BenchResult, bench_one, run_bench

__all__ = ["BenchConfig", "BenchReport", "BenchResult", "LatencyStats", "PreprocessStats", "bench_one",
           "run_bench", "time_inference", "time_preprocessing"]
