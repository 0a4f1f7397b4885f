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
PROFILE_STRIPS = 4  # in this many strips of consecutive rows: a chunked source (zarr) fetches whole chunk rows of
# every layer, so rows spread one by one over the fragment would fetch its whole volume; a strip is an aligned block
# (its first row a multiple of its height), inside one chunk row of any source whose chunk height it divides


def depth_order(num_slices, reverse):
    """Source layer numbers in stored order."""
    order = np.arange(num_slices)
    return order[::-1] if reverse else order


def profile_rows(mask, rows=PROFILE_ROWS, strips=PROFILE_STRIPS):
    """The rows the profile samples: `strips` aligned blocks of rows // strips rows, chosen among the blocks holding
    papyrus at the middles of `strips` equal shares of them (not at the mask's rim; fewer when fewer hold papyrus)."""
    height = max(1, rows // strips)
    starts = np.arange(0, len(mask), height)
    with_papyrus = starts[np.maximum.reduceat(mask.any(1), starts)]
    if len(with_papyrus) == 0:
        return np.zeros(0, np.int64)
    middles = ((np.arange(strips) + 0.5) * len(with_papyrus) / strips).astype(int)
    return np.concatenate([np.arange(y, min(len(mask), y + height)) for y in np.unique(with_papyrus[middles])])


def intensity_profile(fragment, reverse=False, rows=PROFILE_ROWS):
    """(num_slices,) float64: the mean in-mask intensity of every slice, in stored order, from `rows` rows in strips
    spread over the rows holding papyrus (profile_rows)."""
    mask = fragment.read_mask().astype(bool)
    sample = profile_rows(mask, rows)
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
