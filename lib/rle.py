"""Kaggle run-length encoding of binary masks.

A mask becomes "start length start length ...": starts are 1-indexed pixel numbers in row-major order
(the competition's: pixel p is at row (p-1) // W, column (p-1) % W).
"""
import numpy as np


def rle_encode(mask: np.ndarray) -> str:
    """Encode a binary HxW mask (nonzero = 1); an empty mask gives ""."""
    flat = (np.asarray(mask) != 0).ravel()
    # zero padding on both ends makes every run have a rising and a falling edge,
    # including runs that touch the first or last pixel
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed pixel numbers
    starts, ends = edges[0::2], edges[1::2]
    runs = np.column_stack([starts, ends - starts]).ravel()
    return " ".join(map(str, runs.tolist()))


def parse_runs(rle: str, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Split an RLE string into (starts, lengths), validated like the Kaggle metric."""
    try:
        values = np.array(rle.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"RLE must contain only integers, got {rle[:80]!r}") from None
    if values.size % 2:
        raise ValueError(f"RLE needs start/length pairs, got {values.size} numbers")
    starts, lengths = values[0::2], values[1::2]
    if values.size == 0:
        return starts, lengths
    ends = starts + lengths  # 1-indexed, exclusive
    if starts.min() < 1:
        raise ValueError(f"RLE starts must be positive, got {starts.min()}")
    if lengths.min() < 1:
        raise ValueError(f"RLE lengths must be positive, got {lengths.min()}")
    if np.any(np.diff(starts) <= 0):
        raise ValueError("RLE starts must be sorted in increasing order")
    if np.any(starts[1:] < ends[:-1]):
        raise ValueError("RLE runs overlap")
    if ends[-1] - 1 > n_pixels:
        raise ValueError(f"RLE run ends at pixel {ends[-1] - 1}, past the image's {n_pixels} pixels")
    return starts, lengths


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode an RLE string into a uint8 mask of `shape`; "" gives all zeros."""
    n_pixels = int(np.prod(shape))
    starts, lengths = parse_runs(rle, n_pixels)
    # +1 where a run starts, -1 just past where it ends; the running sum is the mask.
    # Runs are sorted and disjoint, so no index repeats within starts or within ends.
    steps = np.zeros(n_pixels + 1, dtype=np.int8)
    steps[starts - 1] += 1
    steps[starts + lengths - 1] -= 1
    flat = np.cumsum(steps[:-1], dtype=np.int8)
    return flat.astype(np.uint8).reshape(shape)


class RleBuilder:
    """The RLE of a (H, W) mask given a band of rows at a time, in order: each band encoded (rle_encode), checked by
    decoding it (a wrong submission must never be written), moved to its place in the whole, and a run that
    crosses a band's edge joined."""

    def __init__(self, width):
        self.width, self.next_row, self.runs = width, 0, []

    def add(self, y0, band):
        if y0 != self.next_row or band.shape[1] != self.width:
            raise ValueError(f"RLE band at row {y0}, expected row {self.next_row} and width {self.width}")
        text = rle_encode(band)
        if not np.array_equal(rle_decode(text, band.shape), np.asarray(band) != 0):
            raise ValueError(f"RLE of rows {y0}:{y0 + len(band)} does not decode to them")
        runs = np.array(text.split(), np.int64).reshape(-1, 2)
        runs[:, 0] += y0 * self.width
        if len(runs) and self.runs and self.runs[-1][-1].sum() == runs[0, 0]:  # the last run ends where this starts
            self.runs[-1][-1, 1] += runs[0, 1]
            runs = runs[1:]
        if len(runs):
            self.runs.append(runs)
        self.next_row = y0 + len(band)

    def text(self):
        return " ".join(map(str, np.concatenate(self.runs).ravel().tolist())) if self.runs else ""
