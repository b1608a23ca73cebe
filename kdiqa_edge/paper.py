"""Published results of the method (Hou & Song), for side-by-side reports.

Protocol: random 80/20 split, several runs, median. CLIP ViT-B/32 teacher; students ImageNet-pretrained.
"""

from __future__ import annotations

DATASETS = ("csiq", "live", "koniq", "spaq")

# The paper's student names -> timm model names.
STUDENTS = {
    "swin_tiny_patch4_window7_224": "CLIP->Swin-T (28M)",
    "resnet18": "CLIP->ResNet-18 (12M)",
    "mobilevit_s": "CLIP->MobileViT-S (6M)",
    "efficientnet_b0": "CLIP->EfficientNet-B0 (5M)",
}

# Table I: (PLCC, SRCC) per dataset, for the distilled students (variant "full").
TABLE_I = {
    "swin_tiny_patch4_window7_224": {"csiq": (0.990, 0.988), "live": (0.985, 0.982),
                                     "koniq": (0.936, 0.923), "spaq": (0.930, 0.925)},
    "resnet18": {"csiq": (0.980, 0.976), "live": (0.958, 0.975), "koniq": (0.884, 0.851), "spaq": (0.905, 0.899)},
    "mobilevit_s": {"csiq": (0.986, 0.982), "live": (0.979, 0.975), "koniq": (0.912, 0.890), "spaq": (0.918, 0.912)},
    "efficientnet_b0": {"csiq": (0.981, 0.978), "live": (0.977, 0.976), "koniq": (0.898, 0.873),
                        "spaq": (0.918, 0.910)},
}

# Table II: PLCC per (student, variant) and dataset. Paper rows: X = regression head, +hard, +soft, +ours.
TABLE_II = {
    ("swin_tiny_patch4_window7_224", "regression"): (0.987, 0.981, 0.926, 0.927),
    ("swin_tiny_patch4_window7_224", "hard"): (0.841, 0.789, 0.831, 0.858),
    ("swin_tiny_patch4_window7_224", "soft"): (0.977, 0.949, 0.926, 0.927),
    ("swin_tiny_patch4_window7_224", "full"): (0.990, 0.985, 0.936, 0.930),
    ("resnet18", "regression"): (0.968, 0.955, 0.843, 0.893),
    ("resnet18", "hard"): (0.832, 0.782, 0.775, 0.836),
    ("resnet18", "soft"): (0.967, 0.924, 0.881, 0.903),
    ("resnet18", "full"): (0.980, 0.958, 0.884, 0.905),
    ("mobilevit_s", "regression"): (0.975, 0.962, 0.897, 0.909),
    ("mobilevit_s", "hard"): (0.817, 0.766, 0.810, 0.843),
    ("mobilevit_s", "soft"): (0.971, 0.940, 0.904, 0.914),
    ("mobilevit_s", "full"): (0.986, 0.979, 0.912, 0.918),
    ("efficientnet_b0", "regression"): (0.959, 0.947, 0.860, 0.898),
    ("efficientnet_b0", "hard"): (0.826, 0.772, 0.797, 0.845),
    ("efficientnet_b0", "soft"): (0.968, 0.945, 0.887, 0.910),
    ("efficientnet_b0", "full"): (0.981, 0.977, 0.898, 0.918),
}


def table_i(student: str, dataset: str) -> tuple[float, float] | None:
    return TABLE_I.get(student, {}).get(dataset)


def table_ii(student: str, variant: str, dataset: str) -> float | None:
    row = TABLE_II.get((student, variant))
    if row is None or dataset not in DATASETS:
        return None
    return row[DATASETS.index(dataset)]
