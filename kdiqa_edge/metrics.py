"""IQA metrics with numpy + scipy only (no torch): usable by `bench` on a Jetson or a Mac.

PLCC is reported twice, labelled: raw (pyiqa's benchmark) and after the VQEG 4-parameter logistic fit
`(b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2` with init [max y, min y, mean x, std x / 4] (LIQE/TOPIQ).
RMSE is computed after the same fit. SRCC and KRCC are rank measures and need no fit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from kdiqa_edge.errors import KdiqaError


class MetricError(KdiqaError):
    """Predictions or labels that no correlation can be computed from."""


@dataclass(frozen=True)
class IQAMetrics:
    plcc: float  # Pearson, raw predictions
    plcc_fit: float  # Pearson after the 4-parameter logistic fit
    srcc: float  # Spearman rank
    krcc: float  # Kendall tau-b
    rmse: float  # RMSE after the logistic fit, in MOS units
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def logistic_4(x, b1, b2, b3, b4):
    from scipy.special import expit  # 1 / (1 + exp(-z)) without overflow

    return (b1 - b2) * expit((x - b3) / b4) + b2


def _logistic_4_jacobian(x, b1, b2, b3, b4):
    # Analytic: curve_fit's finite differences scale their step by |b|, so a b3 that starts at 0 (centred
    # predictions) would never move.
    from scipy.special import expit

    s = expit((x - b3) / b4)
    slope = (b1 - b2) * s * (1.0 - s)
    return np.stack([s, 1.0 - s, -slope / b4, -slope * (x - b3) / b4 ** 2], axis=1)


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Map predictions onto the MOS scale with the 4-parameter logistic (least squares).

    Fitted from the VQEG start [max y, min y, mean x, std x / 4] and from its mirror [min y, max y, ...]
    (predictions that fall as MOS rises, e.g. a DMOS-style model), keeping the smaller squared error; a
    linear map where that fits better still (a local optimum, or a fit that did not converge), so the
    fitted PLCC is never below |raw PLCC|.
    """
    from scipy.optimize import curve_fit

    pred = np.asarray(pred, np.float64)
    mos = np.asarray(mos, np.float64)
    slope, intercept = np.polyfit(pred, mos, 1)
    best = slope * pred + intercept
    if pred.size <= 4:  # no more points than parameters: the logistic is not determined
        return best
    b4 = np.std(pred) / 4.0 or 1.0
    for p0 in ([np.max(mos), np.min(mos), np.mean(pred), b4], [np.min(mos), np.max(mos), np.mean(pred), b4]):
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                params, _ = curve_fit(logistic_4, pred, mos, p0=p0, jac=_logistic_4_jacobian, maxfev=20000)
                fitted = logistic_4(pred, *params)  # a saturated fit overflows exp() harmlessly (-> b1 or b2)
        except (RuntimeError, ValueError, TypeError):
            continue  # did not converge from this start
        if np.all(np.isfinite(fitted)) and np.sum((fitted - mos) ** 2) < np.sum((best - mos) ** 2):
            best = fitted
    return best


def _check(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64).reshape(-1)
    mos = np.asarray(mos, np.float64).reshape(-1)
    if pred.shape != mos.shape:
        raise MetricError(f"{pred.size} predictions for {mos.size} scores")
    if pred.size < 3:
        raise MetricError(f"need at least 3 images to correlate, got {pred.size}")
    bad = int((~np.isfinite(pred)).sum())
    if bad:
        raise MetricError(f"{bad} of {pred.size} predictions are NaN or infinite")
    if not np.all(np.isfinite(mos)):
        raise MetricError("the scores contain NaN or infinite values")
    return pred, mos


def evaluate(pred, mos) -> IQAMetrics:
    """All metrics for predictions vs MOS. Constant predictions correlate at 0 (with a warning), not NaN."""
    from scipy import stats

    pred, mos = _check(pred, mos)
    if np.ptp(pred) == 0 or np.ptp(mos) == 0:
        warnings.warn("constant predictions or scores: correlations are undefined and reported as 0",
                      RuntimeWarning, stacklevel=2)
        rmse = float(np.sqrt(np.mean((mos - mos.mean()) ** 2)))
        return IQAMetrics(0.0, 0.0, 0.0, 0.0, rmse, int(pred.size))
    fitted = fit_logistic(pred, mos)
    plcc_fit = stats.pearsonr(fitted, mos)[0] if np.ptp(fitted) > 0 else 0.0
    return IQAMetrics(
        plcc=float(stats.pearsonr(pred, mos)[0]),
        plcc_fit=float(plcc_fit),
        srcc=float(stats.spearmanr(pred, mos)[0]),
        krcc=float(stats.kendalltau(pred, mos)[0]),
        rmse=float(math.sqrt(np.mean((fitted - mos) ** 2))),
        n=int(pred.size),
    )


def format_metrics(m: IQAMetrics) -> str:
    return (f"PLCC {m.plcc:.4f} (fitted {m.plcc_fit:.4f})  SRCC {m.srcc:.4f}  KRCC {m.krcc:.4f}  "
            f"RMSE {m.rmse:.4f}  n={m.n}")
