"""IQA models: the CLIP teacher, the quality head, students, checkpoints (torch)."""

from kdiqa_edge.models.checkpoint import (
    CHECKPOINT_BUILDERS,
    load_checkpoint,
    read_meta,
    register_checkpoint_kind,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from kdiqa_edge.models.head import DEFAULT_TEMPLATES, LEVEL_NAMES, LEVELS, QualityHead, build_anchors

__all__ = [
    "CHECKPOINT_BUILDERS", "DEFAULT_TEMPLATES", "LEVELS", "LEVEL_NAMES", "QualityHead", "build_anchors",
    "load_checkpoint", "read_meta", "register_checkpoint_kind", "resolve_checkpoint_dir", "save_checkpoint",
]
