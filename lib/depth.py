"""Which source slices a store keeps, in which order: the depth direction and the window around the surface.

Models read slices by number in one frame for every fragment: slice 32 (NOMINAL_SURFACE) is the papyrus surface,
papyrus lies below it (lower numbers) and air above, as in the Kaggle fragments. A store keeps the slices
z_start..z_stop of that frame (default 24:40); `kept_layers` says which source layer each one is:

- reverse: the source is stored with its depth axis flipped (the recto surface at the high layer numbers, as in
  some published segments), so layer N-1 becomes slice 0;
- surface (`--z-range auto`): the window moves so that the fragment's own surface lands on slice 32.

Both are decided from the mean intensity along z inside the mask, over a subsample of rows (bounded memory),
by lib/surface.py (`orientation`, `fragment_surface`).
"""
import numpy as np

from lib.fragments import FragmentError

NOMINAL_SURFACE = 32  # the surface slice in the frame models see (the Kaggle fragments' nominal surface)
PROFILE_ROWS = 64  # rows sampled per slice for the intensity profile


def depth_order(num_slices, reverse):
    """Source layer numbers in stored order."""
    order = np.arange(num_slices)
    return order[::-1] if reverse else order


def intensity_profile(fragment, reverse=False, rows=PROFILE_ROWS):
    """(num_slices,) float64: the mean in-mask intensity of every slice, in stored order, from `rows` evenly
    spaced rows (the rows with most mask pixels when the mask is small: only rows holding papyrus count)."""
    mask = fragment.read_mask().astype(bool)
    rows_with_mask = np.flatnonzero(mask.any(1))
    sample = rows_with_mask[np.linspace(0, len(rows_with_mask) - 1, min(rows, len(rows_with_mask))).astype(int)]
    inside = mask[sample]
    means = [fragment.read_rows(z, sample)[inside].mean(dtype=np.float64) for z in range(fragment.num_slices)]
    return np.asarray(means)[depth_order(fragment.num_slices, reverse)]


def kept_layers(num_slices, z_range, reverse=False, surface=None, where="this fragment"):
    """Source layer numbers of the slices z_range[0]:z_range[1] of the model frame, in order."""
    shift = 0 if surface is None else int(np.floor(surface + 0.5)) - NOMINAL_SURFACE
    start, stop = z_range[0] + shift, z_range[1] + shift
    if not 0 <= start < stop <= num_slices:
        found = "" if surface is None else f" (surface at slice {surface:.1f})"
        raise FragmentError(f"{where}: slices {start}:{stop}{found} are outside its {num_slices} layers")
    return [int(z) for z in depth_order(num_slices, reverse)[start:stop]]
