"""`models:/NAME/VERSION` (also `models:/NAME/latest`, `models:/NAME@ALIAS`): a version of a model in MLflow's
registry, as the local artifact `QualityModel.load` opens.

The registry is MLflow's own configuration: MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI where it differs).
A version's files (what `export --mlflow-register` registered: the export's folder) are downloaded once into
the cache (`cache_dir()/mlflow-models/<store>/<name>/<version>`, written as one atomic folder; a version's
files never change), and the artifact is the file the version's `kdiqa_edge.file` tag names, else the one
runnable artifact in the folder. Torch-free; mlflow is imported only here, only for such a URI.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import quote

from kdiqa_edge.errors import CheckpointError, first_line, require
from kdiqa_edge.runtime.base import ARTIFACT_SUFFIXES

SCHEME = "models:/"
FILE_TAG = "kdiqa_edge.file"  # set by kdiqa_edge.train.trackers.registry


def is_registry_uri(path) -> bool:
    """A `models:/...` URI, given as text or as a CLI's Path (which keeps its one slash)."""
    return str(path).startswith(SCHEME)


def resolve_model_uri(uri: str) -> Path:
    """The local artifact of a registered model version (downloaded on first use)."""
    require("mlflow", "track")
    from mlflow import MlflowClient, get_registry_uri
    from mlflow.exceptions import MlflowException

    from kdiqa_edge.train.trackers.mlflow import quiet  # torch-free

    name, version, alias = _parse(uri)
    client = MlflowClient()
    try:
        with quiet():  # its logging and its download progress bar
            if alias is not None:
                found = client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise CheckpointError(f"{uri}: the registry holds no version of {name!r}")
                found = max(versions, key=lambda v: int(v.version))
            else:
                found = client.get_model_version(name, version)
            folder = _download(name, str(found.version), get_registry_uri())
    except MlflowException as exc:
        raise CheckpointError(f"{uri}: {first_line(exc)}") from exc
    return _artifact(folder, (found.tags or {}).get(FILE_TAG), uri)


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    match = re.fullmatch(r"models:/([^/@]+)(?:/([^/]+)|@([^/]+))", uri)
    if not match or not (match.group(2) == "latest" or (match.group(2) or "").isdigit() or match.group(3)):
        raise CheckpointError(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    return match.group(1), match.group(2), match.group(3)


def _download(name: str, version: str, store: str) -> Path:
    from mlflow.artifacts import download_artifacts

    from kdiqa_edge.io import atomic_path, sweep_temporaries
    from kdiqa_edge.paths import cache_dir

    folder = (cache_dir() / "mlflow-models" / hashlib.sha256(store.encode()).hexdigest()[:12]
              / quote(name, safe="") / version)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(folder.parent, version)  # a download a kill cut short (never a live one's)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            download_artifacts(artifact_uri=f"{SCHEME}{name}/{version}", dst_path=str(tmp))
    return folder


def _artifact(folder: Path, tagged: str | None, uri: str) -> Path:
    if tagged and (folder / tagged).exists():
        return folder / tagged
    found = sorted(p for p in folder.iterdir() if p.suffix in ARTIFACT_SUFFIXES)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(f"{uri}: expected one model artifact in the version's files, found {names}")
    return found[0]
