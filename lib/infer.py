"""Sliding-window prediction of a whole fragment from its tile store.

Tiles on a stride grid are read once with the 8 centre slices; each becomes up to 3 triplet inputs
x 4 rotations (test-time augmentation), all run through the model in one batch, rotated back and
averaged over rotations, then combined over triplets (TRIPLET_MODES). Overlapping tiles are blended with smooth weights that fall towards the tile edges, so there
are no seams. Memory is the (H, W) float32 map and its weight sum, never the tiles of a fragment.
Out-of-fold predictions (train.py) and submissions (submit.py) both go through `predict_fragment`.
"""
import contextlib
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from tqdm import tqdm

from lib.data import CENTRE_SLICES, MIDDLE_TRIPLET, TRIPLETS, normalise, surface_shift
from lib.model import build_from_config

# How the triplets' predictions become one: "mean" of the three (the original solution), their "max", the
# "middle" triplet alone, or "surface": the mean after moving the 8 centre slices so that they centre on the
# fragment's own surface (surface_shift), as the 7th-place team did. "surface" scored best on the out-of-fold maps
# of the demo runs (bench/README.md, "## models").
TRIPLET_MODES = ("mean", "max", "middle", "surface")
DEFAULT_TRIPLETS = "surface"


def triplet_inputs(store, mode):
    """(absolute slices to read, triplets as indices into them, how to combine) for a TRIPLET_MODES mode."""
    if mode not in TRIPLET_MODES:
        raise ValueError(f"unknown triplet mode {mode!r}: choose one of {', '.join(TRIPLET_MODES)}")
    shift = surface_shift(store) if mode == "surface" else 0
    slices = [z + shift for z in CENTRE_SLICES]
    if mode == "middle":
        return slices, (MIDDLE_TRIPLET,), "mean"
    return slices, TRIPLETS, "max" if mode == "max" else "mean"


def blend_weights(tile_size):
    """(T, T) weights: a raised Hann window, highest at the centre and small but positive at the edges."""
    ramp = np.sin(np.pi * (np.arange(tile_size) + 0.5) / tile_size) ** 2
    ramp = 0.02 + 0.98 * ramp
    return np.outer(ramp, ramp).astype(np.float32)


def tta_inputs(tiles, triplets, rotations):
    """(B, 8, T, T) centre-slice tiles -> (B * G * R, 3, T, T): each triplet, each rotation."""
    inputs = [torch.rot90(tiles[:, list(t)], k, (2, 3)) for t in triplets for k in rotations]
    return torch.stack(inputs, dim=1).flatten(0, 1)


def merge_tta(probs, num_tiles, triplets, rotations, combine="mean"):
    """(B * G * R, 1, T, T) probabilities -> (B, T, T): rotate each back, average over rotations, then the
    mean or the max over triplets (`combine`)."""
    probs = probs.view(num_tiles, len(triplets), len(rotations), *probs.shape[-2:])
    unrotated = [torch.rot90(probs[:, :, j], -k, (2, 3)) for j, k in enumerate(rotations)]
    per_triplet = torch.stack(unrotated, dim=2).mean(dim=2)
    return per_triplet.amax(dim=1) if combine == "max" else per_triplet.mean(dim=1)


@torch.inference_mode()
def predict_fragment(model, store, tile_size, stride, batch_size=16, tta=True, triplets=DEFAULT_TRIPLETS,
                     device="cpu", progress=False):
    """Probability map (H, W) float32 of one store, 0 outside its mask.

    `triplets`: one of TRIPLET_MODES. batch_size counts tiles; each tile adds (1 if triplets is "middle" else 3)
    x (4 if tta) inputs to the model's batch.
    """
    device = torch.device(device)
    slices, groups, combine = triplet_inputs(store, triplets)
    rotations = (0, 1, 2, 3) if tta else (0,)
    height, width = store.shape
    total = np.zeros((height, width), np.float32)
    weight_sum = np.zeros((height, width), np.float32)
    weights = blend_weights(tile_size)
    intensity_range = store.intensity_range()
    positions = store.tiles(tile_size, stride)
    model.eval()
    autocast = torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    bar = tqdm(total=len(positions), unit="tile", desc=f"predict {store.fragment_id}", disable=not progress)
    with bar:
        for start in range(0, len(positions), batch_size):
            batch = positions[start: start + batch_size]
            tiles = np.stack([normalise(store.read_tile(y, x, tile_size, tile_size, slices), intensity_range)
                              for y, x in batch])
            inputs = tta_inputs(torch.from_numpy(tiles), groups, rotations).to(device, memory_format=memory_format)
            with autocast:
                probs = torch.sigmoid(model(inputs).float())
            merged = merge_tta(probs, len(batch), groups, rotations, combine).cpu().numpy()
            for (y, x), prob in zip(batch, merged):
                h, w = min(tile_size, height - y), min(tile_size, width - x)
                total[y: y + h, x: x + w] += prob[:h, :w] * weights[:h, :w]
                weight_sum[y: y + h, x: x + w] += weights[:h, :w]
            bar.update(len(batch))
    np.divide(total, weight_sum, out=total, where=weight_sum > 0)
    return total * store.read_map("mask")


def save_probability_map(path, prob, **attrs):
    """Write a probability map as float16 HDF5 (dataset "prob"), atomically: temp name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("prob", data=prob.astype(np.float16), chunks=True, compression="gzip", compression_opts=1)
        h5.attrs.update(attrs)
    os.replace(tmp, path)


def load_probability_map(path):
    """(prob float32 (H, W), attrs dict) from save_probability_map's file."""
    with h5py.File(path, "r") as h5:
        return h5["prob"][()].astype(np.float32), dict(h5.attrs)


def save_preview(path, panels):
    """A PNG of 2-D maps in 0..1 side by side (e.g. probability, binary prediction, label), 8 px apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 8), 128, np.uint8)
    tiles = []
    for panel in panels:
        image = np.zeros((height, panel.shape[1]), np.uint8)
        image[: panel.shape[0]] = (np.clip(panel, 0, 1) * 255).astype(np.uint8)
        tiles += [image, gap]
    image = np.hstack(tiles[:-1])
    scale = min(1.0, 2048 / image.shape[1])  # keep previews of huge fragments viewable
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    tmp = path.with_name(path.stem + ".tmp.png")
    cv2.imwrite(str(tmp), image)
    os.replace(tmp, path)


def load_model_file(path, device="cpu"):
    """A fold model file of train.py -> (the model in eval mode on `device`, the file's other entries:
    config, fold, tile_size, stride, scores).

    The weights are made channels_last: convolutions then run channels_last on CPU too (oneDNN), 1.2-1.8x faster
    for the conv encoders on a 2-core CPU (bench/README.md, "## submit"); on GPU predict_fragment feeds
    channels_last inputs anyway."""
    export = torch.load(path, map_location="cpu", weights_only=True)
    model = build_from_config(export["config"])
    model.load_state_dict(export.pop("state_dict"))
    return model.to(device, memory_format=torch.channels_last).eval(), export


def remove_small_components(binary, min_pixels):
    """A 0/1 uint8 mask without its 8-connected components of fewer than `min_pixels` pixels."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(binary, np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)
