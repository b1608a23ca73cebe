"""Shared test set-up: every test session gets its own cache dir, so nothing touches ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("kdiqa-cache")
    old = os.environ.get("KDIQA_CACHE")
    os.environ["KDIQA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KDIQA_CACHE", None)
    else:
        os.environ["KDIQA_CACHE"] = old


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # Two cores here: keep torch from oversubscribing when several processes run.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


SMALL_REFS = 4  # 4 references x 6 distortions x 5 levels = 120 images


@pytest.fixture(scope="session")
def small_synthetic(_isolated_cache):
    """A small synthetic set shared by the end-to-end tests (the same folder test_distill uses)."""
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.data.synthetic import generate

    root = _isolated_cache / f"synthetic-refs{SMALL_REFS}"
    if not (root / "scores.csv").is_file():
        generate(root, refs=SMALL_REFS)
    return DatasetSpec(name="synthetic", root=root)
