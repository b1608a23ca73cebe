"""Two distillations on the same data need the same fine-tuned teacher: one trains it, the other waits for it
and reuses it (before the lock, both trained it into the same cached run dir, each scalar logged twice)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("torch")


def test_a_distill_waits_for_the_teacher_another_is_fine_tuning_then_reuses_it(small_synthetic):
    from kdiqa_edge.data._lock import waiting_lock
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.train.distill import (
        DistillConfig,
        ensure_teacher,
        teacher_finetune_config,
        teacher_lock,
        teacher_run_dir,
    )
    from kdiqa_edge.train.distributed import DistContext
    from kdiqa_edge.train.finetune import run_finetune

    cfg = DistillConfig(student="test_resnet", pretrained=False, teacher="tiny", epochs=1, batch_size=32,
                        progress=False, seed=11)  # a teacher run of its own in the test cache
    data = absolute_spec(DatasetSpec(name="synthetic", root=small_synthetic.root))
    finetune_cfg = teacher_finetune_config(cfg, data)
    run_dir = teacher_run_dir(finetune_cfg, data)
    lines: list[str] = []
    found: list = []
    with waiting_lock(teacher_lock(run_dir), lambda who: None):  # "another process" fine-tunes it: this test
        waiter = threading.Thread(target=lambda: found.append(ensure_teacher(cfg, data, DistContext(),
                                                                             log=lines.append)))
        waiter.start()
        deadline = time.monotonic() + 120
        while not any("waiting for it" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)  # the waiter's look at the lock
        assert len(lines) == 1 and "is fine-tuning this teacher into" in lines[0] and str(run_dir) in lines[0]
        assert not (run_dir / "checkpoints").exists()  # it trains nothing while the lock is held
        run_finetune(finetune_cfg, data, run_dir)
    waiter.join(timeout=120)
    assert found == [run_dir / "checkpoints" / "best"]
    assert lines[1:] == [f"teacher: reusing the fine-tuned tiny in {run_dir}"]
    epochs = (run_dir / "metrics.csv").read_text().strip().splitlines()[1:]
    assert len(epochs) == finetune_cfg.epochs  # trained once
