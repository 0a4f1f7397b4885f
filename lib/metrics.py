"""Micro F-beta (the competition scores F0.5 over all pixels), a fast threshold sweep, and the binary ink mask a
threshold makes of a probability map (binarise, remove_small_components)."""
import cv2
import numpy as np

DEFAULT_THRESHOLDS = np.arange(0.05, 0.96, 0.05)
DEFAULT_PERCENTS = np.arange(1, 41)  # percentile mode: the top 1 .. 40 % of in-mask pixels
N_BINS = 1000  # probabilities are histogrammed on a 1/N_BINS grid
CHUNK = 1 << 22  # pixels per step of the sweep, so a full fragment needs little extra memory


def fbeta_from_counts(tp, fp, fn, beta: float = 0.5) -> np.ndarray:
    """Elementwise F-beta from pixel counts; 0 where tp == 0 (precision and recall both 0 or undefined)."""
    tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn))
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return np.divide((1 + b2) * tp, denominator, out=np.zeros_like(denominator), where=tp > 0)


def fbeta_counts(tp: int, fp: int, fn: int, beta: float = 0.5) -> float:
    """Micro F-beta from global true positive, false positive and false negative counts."""
    return float(fbeta_from_counts(tp, fp, fn, beta))


def confusion_counts(pred_binary: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(true positives, false positives, false negatives) int64 of a binary prediction (nonzero = ink) against a
    binary target, over all pixels: counts of several images add up to the micro score's."""
    pred, truth = np.asarray(pred_binary) != 0, np.asarray(target) != 0
    tp = np.count_nonzero(pred & truth)
    return np.array([tp, np.count_nonzero(pred) - tp, np.count_nonzero(truth) - tp], np.int64)


def probability_histograms(prob, target, mask=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Histograms of the binned probabilities of inked and of blank pixels inside `mask`,
    plus the count of all inked pixels (inside or outside the mask)."""
    prob, truth = np.ravel(prob), np.ravel(np.asarray(target) != 0)
    inside = None if mask is None else np.ravel(np.asarray(mask) != 0)
    ink = np.zeros(N_BINS + 1, dtype=np.int64)
    blank = np.zeros(N_BINS + 1, dtype=np.int64)
    for lo in range(0, prob.size, CHUNK):
        part = slice(lo, lo + CHUNK)
        # float64 makes prob * N_BINS exact for float16/32 input, so bin >= k <=> prob >= k / N_BINS
        bins = np.clip(np.floor(prob[part].astype(np.float64) * N_BINS), 0, N_BINS).astype(np.int64)
        is_ink = truth[part]
        if inside is not None:
            # pixels outside the mask are predicted 0: drop them from both histograms
            bins, is_ink = bins[inside[part]], is_ink[inside[part]]
        ink += np.bincount(bins[is_ink], minlength=N_BINS + 1)
        blank += np.bincount(bins[~is_ink], minlength=N_BINS + 1)
    return ink, blank, int(np.count_nonzero(truth))


def threshold_counts(prob, target, mask=None, thresholds=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(true positives, predicted pixels) of `prob >= t` inside `mask` for every threshold t (snapped to the
    1/N_BINS grid), and the count of all inked pixels: n_ink - tp are the false negatives."""
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds)
    ink, blank, n_ink = probability_histograms(prob, target, mask)
    # reversed cumulative sums: entry k counts the pixels whose bin is >= k
    tp_at = np.cumsum(ink[::-1])[::-1]
    fp_at = np.cumsum(blank[::-1])[::-1]
    k = np.clip(np.rint(thresholds * N_BINS).astype(np.int64), 0, N_BINS)
    return tp_at[k], tp_at[k] + fp_at[k], n_ink


def fbeta_curve(prob, target, mask=None, thresholds=None, beta: float = 0.5) -> np.ndarray:
    """F-beta of `prob >= t` for every threshold t (snapped to the 1/N_BINS grid)."""
    tp, predicted, n_ink = threshold_counts(prob, target, mask, thresholds)
    return fbeta_from_counts(tp, predicted - tp, n_ink - tp, beta)


def best_threshold(prob, target, mask=None, thresholds=None, beta: float = 0.5) -> tuple[float, float]:
    """(best F-beta, its threshold) over the sweep; ties go to the lowest threshold."""
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds)
    scores = fbeta_curve(prob, target, mask, thresholds, beta)
    best = int(np.argmax(scores))
    return float(scores[best]), float(thresholds[best])


# Threshold modes: "absolute" marks ink where prob >= value; "percentile" marks the top `value` % of a fragment's
# in-mask pixels (the 2nd-place team's rule: it holds when a model's probability scale drifts between fragments).
THRESHOLD_MODES = ("absolute", "percentile")


def top_count(n: int, percent: float) -> int:
    """How many of n pixels are the top `percent` %: at least one, at most n."""
    return min(n, max(1, int(round(n * percent / 100))))


def percentile_cutoff(values, percent: float) -> float:
    """The value v such that `values >= v` holds for the top `percent` % of `values` (ties at v all count)."""
    values = np.ravel(values)
    if values.size == 0:
        return np.inf
    k = values.size - top_count(values.size, percent)
    return np.partition(values, k)[k]


def percentile_counts(prob, target, mask=None, percents=None) -> tuple[np.ndarray, np.ndarray, int]:
    """Like threshold_counts, for percentile mode: (true positives, predicted pixels) of
    `prob >= percentile_cutoff(prob[mask], p)` inside `mask` for every percent p, and the count of all inked pixels."""
    percents = DEFAULT_PERCENTS if percents is None else np.asarray(percents)
    values, truth = np.ravel(prob), np.ravel(np.asarray(target) != 0)
    n_ink = int(np.count_nonzero(truth))
    if mask is not None:
        inside = np.ravel(np.asarray(mask) != 0)
        values, truth = values[inside], truth[inside]
    if values.size == 0:
        return np.zeros(len(percents), np.int64), np.zeros(len(percents), np.int64), n_ink
    # one sort answers every percent: the cutoffs are order statistics, the counts are ranks
    ordered, ink_values = np.sort(values), np.sort(values[truth])
    cutoffs = ordered[[values.size - top_count(values.size, p) for p in percents]]
    predicted = values.size - np.searchsorted(ordered, cutoffs, side="left")
    tp = ink_values.size - np.searchsorted(ink_values, cutoffs, side="left")
    return tp.astype(np.int64), predicted.astype(np.int64), n_ink


def binarise(prob, mask, mode: str, value: float) -> np.ndarray:
    """uint8 0/1 ink prediction inside `mask`: prob >= value ("absolute") or the top value % of the in-mask
    pixels ("percentile"). Its counts match percentile_counts, and threshold_counts at thresholds on its grid."""
    inside = np.asarray(mask) != 0
    if mode == "absolute":
        cutoff = np.float64(value)  # compare in float64, as the histogram bins do (a float32 0.45 is below 0.45)
    elif mode == "percentile":
        cutoff = percentile_cutoff(prob[inside], value)
    else:
        raise ValueError(f"unknown threshold mode {mode!r}; expected one of {THRESHOLD_MODES}")
    return ((prob >= cutoff) & inside).astype(np.uint8)


def remove_small_components(binary, min_pixels):
    """A 0/1 uint8 mask without its 8-connected components of fewer than `min_pixels` pixels."""
    components = BandComponents()
    components.add(binary)
    components.count_areas(min_pixels)
    return components.keep(binary, 0)


class BandComponents:
    """The 8-connected components of a binary mask seen a band of rows at a time, top to bottom, and which are
    smaller than a size across all bands; memory: a label and an area per component, and one row of labels.

    First pass: `add` each band (labels it with OpenCV, joins its labels to those of the band above where they
    touch: a union-find). Then `count_areas` once, and a second pass: `keep` each band again (the same bands, the
    same rows), which labels it again and keeps the pixels of the components of at least the size."""

    def __init__(self):
        self.area = np.zeros(1, np.int64)  # by component label; 0 is the background
        self.parent = np.zeros(1, np.int64)
        self.firsts = []  # each band's first label (its labels are first + OpenCV's, which start at 1)
        self.row = None  # the last band's last row of labels
        self.kept = None

    @staticmethod
    def label(band):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(band, np.uint8), connectivity=8)
        return labels, stats[1:, cv2.CC_STAT_AREA]

    def add(self, band):
        labels, areas = self.label(band)
        first = len(self.area) - 1
        self.firsts.append(first)
        self.area = np.concatenate([self.area, areas])
        self.parent = np.concatenate([self.parent, np.arange(first + 1, len(self.area))])
        top = np.where(labels[0] > 0, labels[0] + first, 0)
        if self.row is not None:  # 8-connected across the boundary: straight down and diagonally
            pairs = np.concatenate([np.stack([self.row[a], top[b]], 1) for a, b in (
                (np.s_[:], np.s_[:]), (np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:]))])
            for above, below in np.unique(pairs[(pairs > 0).all(1)], axis=0).tolist():
                self.union(above, below)
        self.row = np.where(labels[-1] > 0, labels[-1] + first, 0)

    def root(self, label):
        while self.parent[label] != label:
            self.parent[label] = label = self.parent[self.parent[label]]
        return label

    def union(self, a, b):
        a, b = self.root(a), self.root(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def count_areas(self, min_pixels):
        """After the first pass: which labels belong to components of at least `min_pixels` pixels in all."""
        roots = self.parent
        while not np.array_equal(roots, roots[roots]):
            roots = roots[roots]
        self.kept = np.bincount(roots, weights=self.area)[roots] >= min_pixels
        self.kept[0] = False

    def keep(self, band, index):
        """Band number `index` of the first pass (the same band), 0/1 uint8, without the small components' pixels."""
        labels, _ = self.label(band)
        return np.where(labels > 0, self.kept[labels + self.firsts[index]], False).astype(np.uint8)
