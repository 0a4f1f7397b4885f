"""Run-length encoding: Kaggle's examples, edge runs, validation and round trips."""
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from lib.rle import rle_decode, rle_encode

E_RLE = "11 7 20 1 23 1 26 1 29 1 32 1 35 1 38 1 44 1"
# Worked out by hand: in column-major order pixel p (1-indexed) of a 9-row image is at
# row (p-1) % 9, column (p-1) // 9 (0-indexed). "11 7" is column 1, rows 1..7 (the stroke);
# 20/23/26 are column 2 rows 1/4/7, 29/32/35 column 3 rows 1/4/7, 38/44 column 4 rows 1/7.
E_PICTURE = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def test_kaggle_rules_example():
    mask = rle_decode("1 3 10 5", (1, 20))
    assert (np.flatnonzero(mask.ravel()) + 1).tolist() == [1, 2, 3, 10, 11, 12, 13, 14]


def test_worked_example_3x4():
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    assert rle_encode(mask) == "2 2 8 3"
    np.testing.assert_array_equal(rle_decode("2 2 8 3", (3, 4)), mask)


def test_runs_touching_first_and_last_pixel():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[0, :2] = 1
    mask[3, 3:] = 1
    assert rle_encode(mask) == "1 2 19 2"
    np.testing.assert_array_equal(rle_decode("1 2 19 2", (4, 5)), mask)


def test_empty_and_full_masks():
    assert rle_encode(np.zeros((7, 3))) == ""
    np.testing.assert_array_equal(rle_decode("", (7, 3)), np.zeros((7, 3), np.uint8))
    assert rle_encode(np.ones((7, 3), dtype=bool)) == "1 21"
    assert rle_encode(np.full((7, 3), 255, dtype=np.uint8)) == "1 21"
    np.testing.assert_array_equal(rle_decode("1 21", (7, 3)), np.ones((7, 3), np.uint8))


def test_decode_returns_uint8():
    assert rle_decode("1 1", (2, 2)).dtype == np.uint8


def test_the_letter_e():
    """Kaggle's example is column-major: the row-major decoding of the transposed (6, 9) image."""
    e = rle_decode(E_RLE, (6, 9)).T
    np.testing.assert_array_equal(e, E_PICTURE)
    # vertical stroke: column 2, rows 2..8 (1-indexed), nothing else in that column
    assert e[1:8, 1].tolist() == [1] * 7 and e[[0, 8], 1].tolist() == [0, 0]
    assert e[:, 1].sum() == 7
    # the arms are rows 2, 5 and 8 (1-indexed): the only rows with ink right of the stroke
    assert np.flatnonzero(e[:, 2:].any(axis=1)).tolist() == [1, 4, 7]
    assert e[1, 2:].tolist() == [1, 1, 1, 0] and e[7, 2:].tolist() == [1, 1, 1, 0]
    assert e[4, 2:].tolist() == [1, 1, 0, 0]
    assert rle_encode(e.T) == E_RLE
    assert rle_encode(E_PICTURE) != E_RLE  # row-major, as submissions are: other runs
    np.testing.assert_array_equal(rle_decode(rle_encode(E_PICTURE), (9, 6)), E_PICTURE)


@pytest.mark.parametrize(
    "rle, message",
    [
        ("10 2 1 2", "sorted"),
        ("1 5 3 2", "overlap"),
        ("3 0", "lengths must be positive"),
        ("0 2", "starts must be positive"),
        ("19 3", "past the image"),
        ("1 2 3", "pairs"),
        ("1 two", "integers"),
    ],
)
def test_invalid_rle_raises(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (4, 5))


def test_adjacent_runs_and_run_to_last_pixel_are_valid():
    mask = rle_decode("1 2 3 2 18 3", (4, 5))
    assert mask.ravel().tolist() == [1, 1, 1, 1] + [0] * 13 + [1, 1, 1]


masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: arrays(np.uint8, st.sampled_from([shape, (1, shape[1] * 4), (shape[0] * 4, 1)]), elements=st.integers(0, 1))
)


@settings(max_examples=300, deadline=None)
@given(mask=masks)
def test_round_trip(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
    # the encoding lists exactly the inked pixels
    lengths = np.array(rle.split(), dtype=np.int64)[1::2]
    assert lengths.sum() == mask.sum()


@pytest.mark.slow
def test_fragment_sized_mask_is_fast():
    rng = np.random.default_rng(0)
    # blocky ink so the run count resembles a real prediction, not salt-and-pepper noise
    mask = np.kron(rng.random((1483, 951)) > 0.7, np.ones((10, 10), dtype=bool))[:14830, :9506]
    start = time.perf_counter()
    rle = rle_encode(mask)
    decoded = rle_decode(rle, mask.shape)
    elapsed = time.perf_counter() - start
    assert np.array_equal(decoded, mask)
    assert elapsed < 15, f"encode+decode of a 14830x9506 mask took {elapsed:.1f}s"
