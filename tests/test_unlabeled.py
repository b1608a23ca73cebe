"""distill --unlabeled: sources, the pool, feature shards, mixed batches, the masked hard loss, the CLI, DDP."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from cli_helpers import run_cli
from ddp_helpers import become_rank, free_port
from slurm_helpers import FAKE_SBATCH

from kdiqa_edge.data import load_dataset, make_split
from kdiqa_edge.data.tarshards import expand_braces, scan_tar
from kdiqa_edge.data.unlabeled import build_pool, rated_hashes

PHOTOS = 16


def _image_bytes(i: int) -> bytes:
    """A random photo-sized-for-the-tiny-teacher image (70..85 x 90 px), PNG or JPEG."""
    pixels = np.random.default_rng(i).integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG" if i % 2 else "PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, small_synthetic):
    """good/ (16 images, nested), the same 16 in two tar shards (plus unsafe members), lists of them, a
    truncated shard, and messy/: a bad, an empty and a duplicate file, and copies of one rated test and one
    rated train image of the small synthetic set (under other names)."""
    root = tmp_path_factory.mktemp("unlabeled")
    names = [f"{'sub/' if i >= 10 else ''}p{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(PHOTOS)]
    for i, name in enumerate(names):
        (root / "good" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "good" / name).write_bytes(_image_bytes(i))
    for shard in range(2):
        with tarfile.open(root / f"shards-{shard:03d}.tar", "w") as tar:
            for i in range(shard * 8, shard * 8 + 8):
                _add(tar, f"{i:06d}.{names[i].rsplit('.', 1)[1]}", _image_bytes(i))
                _add(tar, f"{i:06d}.cls", b"3")  # a webdataset sidecar: not an image, not reported
            if shard == 0:
                _add(tar, "../escape.jpg", b"x")
                _add(tar, "/etc/abs.jpg", b"x")
                _add(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
                _add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
    data = (root / "shards-001.tar").read_bytes()
    (root / "cut.tar").write_bytes(data[:len(data) // 2])
    (root / "list.txt").write_text("".join(f"good/{n}\n" for n in names) + "# a comment\nmissing.jpg\n")
    with open(root / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "note"], *[[str(root / "good" / n), "x"] for n in names]])

    dataset = load_dataset(small_synthetic)
    split = make_split(dataset, seed=0)
    messy = root / "messy"
    messy.mkdir()
    (messy / "bad.jpg").write_bytes(b"not an image at all")
    (messy / "empty.png").write_bytes(b"")
    (messy / "again.png").write_bytes(_image_bytes(0))
    shutil.copy(dataset.path(split.test[0]), messy / "renamed_test_image.png")
    shutil.copy(dataset.path(split.train[0]), messy / "renamed_train_image.png")
    return root


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory):
    """The tiny teacher (random init) saved as a bare checkpoint: no run dir, so any split may use it."""
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    torch.manual_seed(0)
    return save_checkpoint(load_teacher("tiny"), tmp_path_factory.mktemp("teacher") / "tiny")


# -- sources and the pool (no torch work)


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_sources_agree_and_bad_entries_are_reported(photos, small_synthetic):
    folder = build_pool([photos / "good"], progress=False)
    assert len(folder) == PHOTOS and folder.hashes == sorted(folder.hashes)
    for other in (photos / "list.txt", photos / "list.csv", str(photos / "shards-{000..001}.tar")):
        assert build_pool([other], progress=False).hashes == folder.hashes, other

    listed = build_pool([photos / "list.txt"], progress=False)
    assert [s.reason for s in listed.skipped] == ["file not found"]

    tars = build_pool([str(photos / "shards-{000..002}.tar")], progress=False)
    reasons = {s.image.removeprefix(f"{photos}/"): s.reason for s in tars.skipped}
    assert reasons["shards-002.tar"] == "tar shard not found"
    assert reasons["shards-000.tar:../escape.jpg"].startswith("unsafe tar member: '..'")
    assert reasons["shards-000.tar:/etc/abs.jpg"] == "unsafe tar member: an absolute path"
    assert reasons["shards-000.tar:link.jpg"].startswith("unsafe tar member: a link")
    assert reasons["shards-000.tar:dev.jpg"] == "unsafe tar member: a device or FIFO entry"
    assert tars.counts["unsafe"] == 4 and len(tars) == PHOTOS
    assert not (photos / "escape.jpg").exists() and not list(photos.glob("0000*"))  # nothing extracted

    scan = scan_tar(photos / "cut.tar")
    assert scan.truncated and 0 < len(scan.members) < 16  # images + sidecars before the break
    cut = build_pool([photos / "cut.tar"], progress=False)
    assert 0 < len(cut) < 8 and cut.hashes == sorted(set(cut.hashes) & set(folder.hashes))
    assert any(s.reason.startswith("truncated tar shard") for s in cut.skipped)

    dataset = load_dataset(small_synthetic)
    exclude = rated_hashes(dataset, make_split(dataset, seed=0))
    messy = build_pool([photos / "good", photos / "messy"], exclude, progress=False)
    c = messy.counts
    assert (c["found"], c["used"], c["in_test_split"], c["already_rated"], c["duplicates"], c["unreadable"]) \
        == (PHOTOS + 5, PHOTOS, 1, 1, 1, 2)
    reasons = {Path(s.image).name: s.reason for s in messy.skipped}
    assert "rated test split" in reasons["renamed_test_image.png"]  # matched by content, not by name
    assert reasons["bad.jpg"] == "not an image (unidentified format)"
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "duplicate of" in reasons["again.png"] or "duplicate of" in reasons["p00.png"]


def _counting(monkeypatch) -> dict[str, int]:
    """Count the image reads (Entry.read, what hashing reads bytes with) and tar header scans of build_pool."""
    from kdiqa_edge.data import unlabeled

    counts = {"reads": 0, "scans": 0}
    read, scan = unlabeled.Entry.read, unlabeled.scan_tar

    def counted_read(entry):
        counts["reads"] += 1
        return read(entry)

    def counted_scan(path):
        counts["scans"] += 1
        return scan(path)

    monkeypatch.setattr(unlabeled.Entry, "read", counted_read)
    monkeypatch.setattr(unlabeled, "scan_tar", counted_scan)
    return counts


def _pool_facts(pool) -> tuple:
    return pool.hashes, [e.name for e in pool.entries], pool.counts, [(s.image, s.reason) for s in pool.skipped]


def test_hash_index_second_run_reads_only_what_changed(photos, tmp_path, monkeypatch, capsys):
    from kdiqa_edge.data.hashindex import HashIndex
    from kdiqa_edge.data.unlabeled import Entry, identify

    monkeypatch.setenv("KDIQA_CACHE", str(tmp_path / "cache"))  # the index under paths.cache_dir()
    work = tmp_path / "src"
    shutil.copytree(photos / "good", work / "good")
    shutil.copytree(photos / "messy", work / "messy")
    for shard in ("shards-000.tar", "shards-001.tar"):
        shutil.copy(photos / shard, work / shard)
    hour_ago = time.time() - 3600  # older than the racy window: an entry is recorded
    for path in work.rglob("*"):
        os.utime(path, (hour_ago, hour_ago))
    sources = [work / "good", work / "messy", str(work / "shards-{000..001}.tar")]
    counts = _counting(monkeypatch)
    first = build_pool(sources, progress=False)
    assert counts == {"reads": 2 * PHOTOS + 5, "scans": 2}
    assert (tmp_path / "cache" / "hash-index").is_dir()

    counts.update(reads=0, scans=0)
    again = build_pool(sources, progress=False)
    assert counts == {"reads": 0, "scans": 0}  # no image byte and no tar header read
    assert _pool_facts(again) == _pool_facts(first)

    # one image rewritten (new bytes, new mtime), one only touched: both read again, the new hash used
    changed, touched = work / "good" / "p03.jpg", work / "good" / "p04.png"
    changed.write_bytes(_image_bytes(99))
    os.utime(changed, (hour_ago + 60, hour_ago + 60))
    os.utime(touched, (hour_ago + 60, hour_ago + 60))
    counts.update(reads=0)
    after = build_pool(sources, progress=False)
    assert counts["reads"] == 2
    new_hash = hashlib.sha256(_image_bytes(99)).hexdigest()
    assert new_hash in after.hashes and after.entries[after.hashes.index(new_hash)].name == str(changed)
    assert after.counts["duplicates"] == first.counts["duplicates"] - 1  # p03 is no longer its tar copy's twin

    # a file written just now is read on every run until it is older than the racy window (not recorded)
    (work / "good" / "fresh.png").write_bytes(_image_bytes(50))
    for _ in range(2):
        counts.update(reads=0)
        build_pool([work / "good"], progress=False)
        assert counts["reads"] == 1

    # a corrupt bucket: one note line, rebuilt, its images read again, then remembered
    bucket = HashIndex().bucket_file(os.path.realpath(work / "good"))
    bucket.write_bytes(b'{"format": "kdiqa-edge/hash-index/1", "entr')
    capsys.readouterr()
    counts.update(reads=0)
    rebuilt = build_pool([work / "good"], progress=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: the hash index") and "rebuilt" in lines[0], lines
    assert counts["reads"] == 10 + 1 and len(rebuilt) == PHOTOS + 1  # good/'s 10 (sub/ is its own bucket), fresh
    counts.update(reads=0)
    build_pool([work / "good"], progress=False)
    assert counts["reads"] == 1  # only the racy fresh file

    # two processes' indexes of one folder, saved one after the other: the bucket keeps both halves
    other = tmp_path / "other"
    shutil.copytree(photos / "good", other)
    for path in other.rglob("*"):
        os.utime(path, (hour_ago, hour_ago))
    entries = [Entry(str(p), str(p)) for p in sorted(other.glob("*.*"))]
    one, two = HashIndex(), HashIndex()
    with one:
        identify(entries[:4], one)
    with two:
        identify(entries[4:], two)
    counts.update(reads=0)
    with HashIndex() as three:
        identify(entries, three)
    assert counts["reads"] == 0


def test_unknown_source_is_one_line_error(photos, capsys):
    code, _, err = run_cli(["distill", "--teacher", "tiny", "--unlabeled", photos / "nowhere", "--quiet"], capsys)
    assert code == 2 and "no such folder or file" in err and "Traceback" not in err


# -- the loss and the batches


def test_hard_loss_never_sees_unrated_soft_sees_every_image():
    from kdiqa_edge.train.losses import distill_loss

    u = torch.randn(6, 8, requires_grad=True)
    score = torch.rand(6, requires_grad=True)
    mos = torch.tensor([3.0, 2.0, 4.0, float("nan"), float("nan"), float("nan")])
    rated = torch.tensor([True, True, True, False, False, False])
    terms = distill_loss(u, torch.randn(6, 8), score, mos, 0.5, rated)
    terms["hard"].backward(retain_graph=True)
    assert torch.isfinite(score.grad).all() and (score.grad[3:] == 0).all() and (score.grad[:3] != 0).all()
    expected = 0.5 * ((score[:3] - mos[:3]) ** 2).mean()
    assert float(terms["hard"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    terms["soft"].backward()
    assert (u.grad.abs().sum(1) > 0).all()  # every image, rated or not
    mos[:3] = 1000.0  # what an unrated image's label is cannot matter: only the rated ones are read
    unrated_only = distill_loss(None, None, score, mos.clone().fill_(float("nan")), 0.0, torch.zeros(6, dtype=bool))
    assert float(unrated_only["hard"].detach()) == 0.0


def test_mixed_epochs_hold_the_fraction_and_split_ranks():
    from kdiqa_edge.train.loader import mixed_epoch

    rated, offset = list(range(20)), 100
    one = mixed_epoch(rated, 50, offset, seed=1, epoch=0, micro_batch=8, fraction=0.25)
    assert len(one) == 4 and all((b < offset).sum() == 6 and (b >= offset).sum() == 2 for b in one[:-1])
    assert sorted(np.concatenate([b[b < offset] for b in one])) == rated
    again = mixed_epoch(rated, 50, offset, seed=1, epoch=0, micro_batch=8, fraction=0.25)
    assert all((a == b).all() for a, b in zip(one, again))  # a function of (seed, epoch): resume replays it
    ranks = [mixed_epoch(rated, 50, offset, 1, 3, 4, 0.5, rank=r, world_size=2) for r in range(2)]
    pools = [np.concatenate([b[b >= offset] for b in r]) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) and not set(pools[0]) & set(pools[1])
    only = mixed_epoch([], 50, offset, 1, 0, 8, 0.5)  # no rated image: an epoch is a pass over the pool
    assert len(only) == 7 and set(np.concatenate(only)) == set(range(offset, offset + 50))


# -- feature shards


KILL_AFTER_ONE_SHARD = """
import os, signal, sys
from kdiqa_edge.data.unlabeled import build_pool
from kdiqa_edge.train.features import unlabeled_features
pool = build_pool([sys.argv[1]], progress=False)
unlabeled_features(sys.argv[2], pool, device="cpu", batch_size=3, progress=False, root=sys.argv[3],
                   shard_images=5, workers=0, on_shard=lambda n: os.kill(os.getpid(), signal.SIGKILL))
"""


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.parent.name + "/" + p.name: p.read_bytes() for p in sorted(folder.glob("*/*"))}


def test_feature_shards_reused_resumed_after_kill9_byte_identical(photos, bare_teacher, tmp_path):
    from kdiqa_edge.train.features import unlabeled_features, unlabeled_folder

    pool = build_pool([photos / "good"], progress=False)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_ONE_SHARD, str(photos / "good"), str(bare_teacher),
                             str(tmp_path / "a")], env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert killed.returncode == -9
    folder = unlabeled_folder(bare_teacher, tmp_path / "a")
    assert len([p for p in folder.iterdir() if not p.name.startswith(".")]) == 1  # one whole shard survived

    run = {"device": "cpu", "batch_size": 3, "progress": False, "shard_images": 5, "workers": 2}
    resumed = unlabeled_features(bare_teacher, pool, root=tmp_path / "a", **run)
    assert len(resumed.shards) == 4 and len(resumed.computed) == 3  # only the missing ones
    fresh = unlabeled_features(bare_teacher, pool, root=tmp_path / "b", **{**run, "workers": 0})
    assert _shard_bytes(folder) == _shard_bytes(unlabeled_folder(bare_teacher, tmp_path / "b"))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the killed write's temporary swept
    again = unlabeled_features(bare_teacher, pool, root=tmp_path / "a", **run)
    assert again.computed == [] and (again.gather(np.arange(PHOTOS)) == fresh.gather(np.arange(PHOTOS))).all()

    tars = build_pool([str(photos / "shards-{000..001}.tar")], progress=False)
    from_tar = unlabeled_features(bare_teacher, tars, root=tmp_path / "c", **{**run, "workers": 0})
    assert _shard_bytes(unlabeled_folder(bare_teacher, tmp_path / "c")) == _shard_bytes(folder)
    assert np.abs(from_tar.gather(np.arange(PHOTOS)).astype(np.float32)).sum() > 0


# -- the command line: mixed batches, and pure feature distillation that exports


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_cli_feature_tasks_then_train_mixes_unlabeled_and_excludes_test_images(photos, small_synthetic,
                                                                              bare_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--root", small_synthetic.root, "--teacher-checkpoint", bare_teacher,
            "--student", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "16",
            "--unlabeled", photos / "good", "--unlabeled", photos / "messy",
            "--unlabeled", str(photos / "shards-{000..001}.tar"), "--rated-fraction", "0.2",
            "--unlabeled-fraction", "0.25", "--feature-shard-images", "5", "--workers", "0", "--quiet", "--out", run]
    # the feature work as two scheduler tasks, then the training as a third job that waits for them
    # (submitit's local executor: the SLURM path without sbatch)
    code, out, err = run_cli([*args, "--feature-tasks", "2", "--then-train", "--launcher", "submitit-local",
                              "--wait"], capsys)
    assert code == 0, err
    import pickle

    jobs = json.loads((run / "jobs.json").read_text())["runs"]
    assert set(jobs) == {"features/0", "features/1", "train"}
    assert not (run / "jobs" / "%j").exists()  # each job swept the literal folder submitit-local's controller made
    computed = []
    for task in ("features/0", "features/1"):
        folder = Path(jobs[task]["folder"])
        with open(next(folder.glob("*_result.pkl")), "rb") as handle:
            outcome, keys = pickle.load(handle)
        assert outcome == "success"
        computed.append(set(keys))
    assert computed[0] and computed[1] and not computed[0] & computed[1]  # 17 images, 4 shards: 2 each

    assert _summary(run)["unlabeled"]["computed_by_rank"] == [[]]  # the training waited: every shard the tasks'
    assert _summary(run)["unlabeled"]["shards"] == 4
    assert "2 feature task(s) done" in out and "unlabeled: " in out and f"next: kdiqa-edge export {run}" in out
    train_log = Path(jobs["train"]["folder"]) / f"{jobs['train']['job_id']}_0_log.out"
    assert "1 also in the rated test split (excluded)" in train_log.read_text()
    from kdiqa_edge.train.mixed import rated_subset

    unlabeled = _summary(run)["unlabeled"]
    split = make_split(load_dataset(small_synthetic))
    hidden = split.train[0] not in rated_subset(split.train, 0.2, 0)  # a hidden rating is no rating: it may train
    assert (unlabeled["used"], unlabeled["already_rated"]) == (PHOTOS + hidden, 1 - hidden)
    assert unlabeled["in_test_split"] == 1 and unlabeled["duplicates"] == 1 + PHOTOS
    with open(run / "unlabeled_skipped.csv") as handle:
        rows = {Path(r["image"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert "rated test split" in rows["renamed_test_image.png"] and "unsafe" in rows["shards-000.tar:dev.jpg"]
    # 18 of the 90 training images rated, 12 rated + 4 unlabeled per batch of 16: 2 steps
    assert _summary(run)["steps"] == 2 and _summary(run)["rated_train"] == {"images": 18, "fraction": 0.2}
    assert json.loads((run / "split.json").read_text())["test"] == make_split(load_dataset(small_synthetic)).test




def _sbatch_flags(path: Path) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].partition("=")[::2] for line in path.read_text().splitlines()
                if line.startswith("#SBATCH --"))


def test_cli_then_train_on_slurm_depends_on_the_whole_feature_array(photos, small_synthetic, bare_teacher,
                                                                   tmp_path, monkeypatch, capsys):
    submitit = pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "srun": "#!/bin/bash\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    args = ["distill", "--root", small_synthetic.root, "--teacher-checkpoint", bare_teacher, "--student",
            "test_resnet", "--no-pretrained", "--unlabeled", photos / "good", "--out", run, "--quiet"]
    code, out, err = run_cli([*args, "--feature-tasks", "3", "--then-train", "--partition", "gpu", "--time",
                              "1:00:00"], capsys)
    assert code == 0, err
    array, train = _sbatch_flags(bin_dir / "sbatch.1"), _sbatch_flags(bin_dir / "sbatch.2")
    assert not (bin_dir / "sbatch.3").exists()  # the array and the training: two submissions
    assert array["array"] == "0-2%3" and "dependency" not in array
    assert train["dependency"] == "afterok:1" and train["kill-on-invalid-dep"] == "yes" and "array" not in train
    assert (train["partition"], train["time"]) == ("gpu", "60")
    jobs = json.loads((run / "jobs.json").read_text())["runs"]
    assert {k: v["job_id"] for k, v in jobs.items()} == {"features/0": "1_0", "features/1": "1_1",
                                                         "features/2": "1_2", "train": "2"}
    job = submitit.core.utils.DelayedSubmission.load(Path(jobs["train"]["folder"]) / "2_submitted.pkl").function
    assert (job.out, job.after, job.config["unlabeled"]) == (str(run), None, [str(photos / "good")])
    assert hasattr(job, "checkpoint") and "to start when the feature task(s) array 1 succeeded" in out

    code, _, err = run_cli([*args, "--then-train"], capsys)
    assert code == 2 and "--then-train goes with --feature-tasks" in err and "Traceback" not in err


def test_local_training_job_refuses_to_train_after_a_failed_feature_task(tmp_path):
    import pickle

    from kdiqa_edge.train.launch import LaunchError, _wait_for_features

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a controller gone without a result: the task died
    failed, succeeded = tmp_path / "11", tmp_path / "12"
    for folder, outcome in ((failed, "error"), (succeeded, "success")):
        folder.mkdir()
        (folder / f"{folder.name}_0_result.pkl").write_bytes(pickle.dumps((outcome, "...")))
    _wait_for_features([{"job_id": "12", "folder": str(succeeded)}])
    for job_id, folder in (("11", failed), (str(ended.pid), tmp_path / "gone")):
        with pytest.raises(LaunchError, match=f"feature task job {job_id} did not succeed: not training"):
            _wait_for_features([{"job_id": "12", "folder": str(succeeded)}, {"job_id": job_id, "folder": str(folder)}])


def test_soft_variant_on_unlabeled_only_trains_and_exports(photos, small_synthetic, bare_teacher, tmp_path, capsys):
    run = tmp_path / "soft"
    code, _, err = run_cli(["distill", "--root", small_synthetic.root, "--teacher-checkpoint", bare_teacher,
                              "--student", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
                              "--variant", "soft", "--rated-fraction", "0", "--unlabeled", photos / "good",
                              "--image-cache", "--quiet", "--out", run], capsys)
    assert code == 0, err
    summary = _summary(run)
    assert summary["steps"] == 2 and summary["unlabeled"]["used"] == PHOTOS and summary["unlabeled"]["image_cache"]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["soft"]) > 0 and float(rows[0]["hard"]) == 0.0
    code, _out, err = run_cli(["export", run, "--target", "onnx", "--precision", "fp32", "--out", tmp_path / "x"],
                             capsys)
    assert code == 0, err
    assert (tmp_path / "x" / "onnx-fp32" / "model.fp32.onnx").is_file()

    code, _, err = run_cli(["distill", "--root", small_synthetic.root, "--teacher-checkpoint", bare_teacher,
                            "--variant", "full", "--rated-fraction", "0", "--unlabeled", photos / "good",
                            "--quiet", "--out", tmp_path / "no"], capsys)
    assert code == 2 and "use --variant soft" in err


# -- DDP: two gloo processes (torchrun's environment) split the feature shards


def _ddp_worker(rank: int, world_size: int, port: int, cache_dir: str, teacher: str, source: str, out: str):
    from kdiqa_edge.train.distributed import destroy_process_group, init_distributed
    from kdiqa_edge.train.features import unlabeled_features

    become_rank(rank, world_size, port, cache_dir)
    ctx, _ = init_distributed("cpu")
    pool = build_pool([source], progress=False)
    share = unlabeled_features(teacher, pool, device="cpu", batch_size=128, progress=False, root=Path(out),
                               shard_images=3, workers=0, ctx=ctx)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(share.computed))
    destroy_process_group()


def test_ddp_two_ranks_split_feature_shards(photos, bare_teacher, tmp_path):
    import torch.multiprocessing as mp

    from kdiqa_edge import paths
    from kdiqa_edge.train.features import unlabeled_features

    mp.spawn(_ddp_worker, nprocs=2, args=(2, free_port(), str(paths.cache_dir()), str(bare_teacher),
                                          str(photos / "good"), str(tmp_path / "two")))
    zero, one = (set(json.loads((tmp_path / "two" / f"rank{r}.json").read_text())) for r in range(2))
    pool = build_pool([photos / "good"], progress=False)
    single = unlabeled_features(bare_teacher, pool, device="cpu", batch_size=128, progress=False,
                                root=tmp_path / "single", shard_images=3, workers=0)
    assert zero and one and not zero & one and zero | one == {s.key for s in single.shards}  # 6 shards, 3 each
    two = unlabeled_features(bare_teacher, pool, device="cpu", batch_size=128, progress=False,
                             root=tmp_path / "two", shard_images=3, workers=0)
    assert two.computed == []  # the ranks wrote them all
    rows = np.arange(PHOTOS)
    np.testing.assert_allclose(two.gather(rows).astype(np.float32), single.gather(rows).astype(np.float32),
                               atol=2e-3, rtol=2e-3)


# -- reproduce --unlabeled


def test_reproduce_passes_unlabeled_to_every_soft_distillation(photos, small_synthetic, tmp_path, capsys,
                                                                monkeypatch):
    from kdiqa_edge.train import reproduce
    from kdiqa_edge.train.reproduce import ReproduceConfig, _distill_config, plan

    monkeypatch.setattr(reproduce, "_throughput", lambda *_: 0.01)  # the plan's arithmetic, not a measurement

    args = ["reproduce", "--root", small_synthetic.root, "--students", "test_resnet", "--seeds", "1",
            "--epochs", "1", "--teacher", "tiny", "--no-pretrained", "--dry-run", "--out", tmp_path / "r"]
    code, plain, err = run_cli(args, capsys)
    assert code == 0, err
    code, mixed, err = run_cli([*args, "--unlabeled", photos / "good", "--unlabeled-fraction", "0.75"], capsys)
    assert code == 0, err
    hours = [float(text.split("estimated training time: ")[1].split(" h")[0]) for text in (plain, mixed)]
    # teacher 90 images + student 90 -> the student's 90 rated ride with 270 unlabeled: (90 + 360) / 180
    assert hours[1] / hours[0] == pytest.approx(2.5, rel=0.05)

    cfg = ReproduceConfig(students=["test_resnet"], variants=["full", "regression"], seeds=1,
                          unlabeled=[str(photos / "good")], unlabeled_fraction=0.75)
    configs = {run.variant: _distill_config(cfg, run, tmp_path / "teacher") for run in plan(cfg, tmp_path)
               if run.stage == "distill"}
    assert configs["full"].unlabeled == [str(photos / "good")] and configs["full"].unlabeled_fraction == 0.75
    assert configs["regression"].unlabeled == []  # no soft loss: nothing for unlabeled images to teach
