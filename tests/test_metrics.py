"""F-beta: hand-computed values, the histogram sweep against a naive loop, and its speed."""
import time

import numpy as np
import pytest

from lib.metrics import best_threshold, confusion_counts, fbeta_counts, fbeta_curve


def naive_fbeta(pred, target, beta):
    tp = np.sum(pred & target)
    fp = np.sum(pred & ~target)
    fn = np.sum(~pred & target)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def test_fbeta_counts_by_hand():
    # precision 3/4, recall 3/5: F0.5 = 1.25 * 0.75 * 0.6 / (0.25 * 0.75 + 0.6) = 0.5625 / 0.7875
    assert fbeta_counts(3, 1, 2) == pytest.approx(0.5625 / 0.7875)
    assert fbeta_counts(3, 1, 2, beta=1.0) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert fbeta_counts(0, 5, 5) == 0.0
    assert fbeta_counts(0, 0, 0) == 0.0


def test_confusion_counts_pixels():
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.uint8)
    target = np.array([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=np.uint8)
    assert confusion_counts(pred, target).tolist() == [3, 1, 2]
    assert fbeta_counts(*confusion_counts(pred, target)) == pytest.approx(0.5625 / 0.7875)
    assert fbeta_counts(*confusion_counts(target, target)) == 1.0
    assert fbeta_counts(*confusion_counts(np.zeros_like(target), target)) == 0.0


def random_case(seed, shape=(300, 400)):
    rng = np.random.default_rng(seed)
    target = rng.random(shape) < 0.2
    # informative but noisy probabilities, so the curve has a real maximum
    prob = np.clip(0.35 * target + rng.random(shape) * 0.7, 0, 1).astype(np.float32)
    return prob, target


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_curve_matches_naive_loop(dtype):
    prob, target = random_case(1)
    prob = prob.astype(dtype)
    thresholds = np.array([0.0, 0.05, 0.123, 0.3, 0.5, 0.501, 0.75, 0.999, 1.0])
    curve = fbeta_curve(prob, target, thresholds=thresholds)
    expected = [naive_fbeta(prob >= t, target, 0.5) if (prob >= t).any() else 0.0 for t in thresholds]
    np.testing.assert_allclose(curve, expected, rtol=1e-12)


def test_mask_predicts_zero_outside_but_keeps_labels():
    prob, target = random_case(2)
    mask = np.zeros(prob.shape, dtype=bool)
    mask[50:250, 100:300] = True
    thresholds = np.arange(0.05, 0.96, 0.05)
    curve = fbeta_curve(prob, target, mask=mask, thresholds=thresholds)
    expected = [naive_fbeta((prob >= t) & mask, target, 0.5) for t in thresholds]
    np.testing.assert_allclose(curve, expected, rtol=1e-12)
    # ink outside the mask is missed, so masking must lower the score here
    assert curve.max() < fbeta_curve(prob, target, thresholds=thresholds).max()


def test_best_threshold_picks_curve_maximum():
    prob, target = random_case(3)
    thresholds = np.arange(0.05, 0.96, 0.05)
    best_f, best_t = best_threshold(prob, target, thresholds=thresholds)
    naive = [naive_fbeta(prob >= t, target, 0.5) for t in thresholds]
    assert best_f == pytest.approx(max(naive), rel=1e-12)
    assert best_t == pytest.approx(thresholds[int(np.argmax(naive))])
    assert 0.3 < best_t < 0.8


def test_best_threshold_perfect_and_empty_predictions():
    target = np.zeros((50, 60), dtype=np.uint8)
    target[10:20, 5:40] = 1
    assert best_threshold(target.astype(np.float32), target) == (1.0, 0.05)
    assert best_threshold(np.zeros((50, 60), np.float32), target)[0] == 0.0


def test_best_threshold_speed_on_4000x4000():
    rng = np.random.default_rng(4)
    prob = rng.random((4000, 4000), dtype=np.float32)
    target = prob + rng.normal(0, 0.3, prob.shape).astype(np.float32) > 0.8
    mask = np.ones(prob.shape, dtype=bool)
    start = time.perf_counter()
    best_f, _ = best_threshold(prob, target, mask=mask)
    elapsed = time.perf_counter() - start
    assert 0 < best_f < 1
    assert elapsed < 2.0, f"best_threshold took {elapsed:.2f}s"
