"""IQA metrics against scipy and against cases computed by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from kdiqa_edge.metrics import MetricError, evaluate, fit_logistic, format_metrics, logistic_4


def test_hand_computed_three_images():
    # pred 1,2,3 vs mos 1,3,2: cov 1, variances 2 -> r = 0.5; same ranks -> rho = 0.5;
    # pairs (+, +, -) -> tau = (2 - 1) / 3
    m = evaluate([1, 2, 3], [1, 3, 2])
    assert m.plcc == pytest.approx(0.5)
    assert m.srcc == pytest.approx(0.5)
    assert m.krcc == pytest.approx(1 / 3)
    assert m.n == 3


def test_perfect_and_reversed_orderings():
    pred = np.array([1.0, 2.0, 3.5, 4.0, 5.0, 6.0])
    m = evaluate(pred, 2 * pred + 1)  # a linear map: every correlation is 1, the fit is exact
    assert (m.plcc, m.srcc, m.krcc) == pytest.approx((1.0, 1.0, 1.0))
    assert m.plcc_fit == pytest.approx(1.0, abs=1e-6) and m.rmse == pytest.approx(0.0, abs=1e-3)
    r = evaluate(pred, -pred)
    assert (r.plcc, r.srcc, r.krcc) == pytest.approx((-1.0, -1.0, -1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    mos = rng.uniform(1, 5, 200)
    pred = mos + rng.normal(0, 0.8, 200)
    pred[::7] = np.round(pred[::7])  # some ties for tau-b
    m = evaluate(pred, mos)
    assert m.plcc == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
    assert m.srcc == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert m.krcc == pytest.approx(stats.kendalltau(pred, mos)[0], abs=1e-12)
    fitted = fit_logistic(pred, mos)
    assert m.plcc_fit == pytest.approx(stats.pearsonr(fitted, mos)[0], abs=1e-12)
    assert m.rmse == pytest.approx(np.sqrt(np.mean((fitted - mos) ** 2)), abs=1e-12)
    assert m.plcc_fit >= m.plcc - 1e-3  # the fit never makes a monotone relation look much worse


def test_logistic_fit_recovers_a_nonlinear_monotone_map():
    pred = np.linspace(-3, 3, 80)
    mos = logistic_4(pred, 5.0, 1.0, 0.3, 0.6)
    m = evaluate(pred, mos)
    assert m.plcc < 0.98  # raw Pearson is hurt by the curvature
    assert m.plcc_fit == pytest.approx(1.0, abs=1e-6) and m.rmse < 1e-3
    assert m.srcc == pytest.approx(1.0)


def test_constant_predictions_warn_and_report_zero():
    mos = np.array([1.0, 2.0, 3.0, 4.0])
    with pytest.warns(RuntimeWarning, match="constant predictions"):
        m = evaluate(np.full(4, 3.2), mos)
    assert (m.plcc, m.plcc_fit, m.srcc, m.krcc) == (0.0, 0.0, 0.0, 0.0)
    assert m.rmse == pytest.approx(np.std(mos))  # the best constant is the mean


def test_saturated_fit_emits_no_numpy_warnings():
    pred = np.array([0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 5.0])
    mos = np.array([1.0, 1.1, 0.9, 5.0, 4.9, 5.1, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate(pred, mos)
    assert np.isfinite([m.plcc, m.plcc_fit, m.rmse]).all()


@pytest.mark.parametrize("pred, mos, message", [
    ([1.0, np.nan, 3.0], [1, 2, 3], "1 of 3 predictions are NaN"),
    ([1.0, np.inf, 3.0, 4.0], [1, 2, 3, 4], "NaN or infinite"),
    ([1.0, 2.0, 3.0], [1, np.nan, 3], "scores contain NaN"),
    ([1.0, 2.0], [1.0, 2.0], "at least 3 images"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "3 predictions for 2 scores"),
])
def test_bad_inputs_give_one_clear_message(pred, mos, message):
    with pytest.raises(MetricError, match=message) as info:
        evaluate(pred, mos)
    assert "\n" not in str(info.value)


def test_format_labels_both_plccs():
    text = format_metrics(evaluate([1, 2, 3, 4], [1, 3, 2, 4]))
    assert "PLCC" in text and "fitted" in text and "SRCC" in text and "n=4" in text
