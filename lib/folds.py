"""Cross-validation folds: fold k holds out train fragment k, or one of K bands of equal mask area of a fragment
cut by --split."""
from dataclasses import dataclass

import numpy as np


def equal_area_bands(mask, num_bands):
    """Row ranges [(y0, y1), ...] that cut a fragment into bands holding equal mask area."""
    rows = np.cumsum(mask.astype(bool).sum(axis=1))
    cuts = [0] + [int(np.searchsorted(rows, rows[-1] * k / num_bands)) + 1 for k in range(1, num_bands)] + [len(rows)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: `name` (unique in a run; file names use it), the held-out train fragment
    `fragment_id`, and `rows` (y0, y1) of the band it holds out, or None for the whole fragment.

    Everything that needs the fragment of a fold reads `fragment_id`: nothing parses names."""
    name: str
    fragment_id: str
    rows: tuple = None

    def as_dict(self):
        return {"name": self.name, "fragment_id": self.fragment_id, "rows": None if self.rows is None else list(self.rows)}

    @classmethod
    def from_dict(cls, d):
        return cls(str(d["name"]), str(d["fragment_id"]), None if d["rows"] is None else tuple(int(r) for r in d["rows"]))


def make_folds(train_ids, split=None, masks=None):
    """Cross-validation folds, [Fold] in train-id order.

    Fold k holds out train fragment k. `split` = (fragment_id, K) cuts that fragment into K bands of
    equal mask area (needs `masks[fragment_id]`), each its own fold named "<id>.<band>" (1-indexed).
    """
    folds = []
    for fragment_id in train_ids:
        if split and fragment_id == split[0]:
            bands = equal_area_bands(masks[fragment_id], split[1])
            folds += [Fold(f"{fragment_id}.{k}", fragment_id, rows) for k, rows in enumerate(bands, start=1)]
        else:
            folds.append(Fold(fragment_id, fragment_id))
    names = [f.name for f in folds]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"fold name {clash[0]} is both a fragment id and a band of a split fragment")
    return folds
