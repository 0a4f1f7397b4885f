"""lib/data.py, lib/inputs.py and lib/infer.py on a real store whose volume spells out its labels."""
import numpy as np
import pytest
import tifffile
import torch
import cv2

from lib.data import TileDataset, blank_boxes, model_batch, paste_boxes, photometric
from lib.folds import Fold, equal_area_bands, make_folds
from lib.fragments import Fragment
from lib.infer import blend_weights, member_views, merge_tta, predict_fragment
from lib.inputs import (CENTRE_SLICES, SURFACE_TRIPLETS, TRIPLET_MODES, TRIPLETS, InputReader, InputSpec, flatten,
                        normalise, surface_shift)
from lib.surface import pixel_window, surface_grid
from lib.synth import FragmentFields, FragmentLevel, write_fragment
from lib.store import Store, write_store

HEIGHT, WIDTH = 200, 168
# the label store has no papyrus surface (its slices are bright where the labels are): read as stored
MEAN = InputSpec("triplets", centre_on="nominal", triplets="mean")
STACK = InputSpec("stack", depth=6, centre_on="nominal")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiles(dataset, indices):
    """(images (B, C, T, T), labels (B, 1, T, T)) of a TileDataset's items, made the model's inputs on the CPU."""
    return model_batch(torch.utils.data.default_collate([dataset[i] for i in indices]), "cpu")


def tile(dataset, i):
    """(image (C, T, T), label (1, T, T)) of one item (tiles)."""
    images, labels = tiles(dataset, [i])
    return images[0], labels[0]


@pytest.fixture(scope="module")
def label_store(tmp_path_factory):
    """A train fragment whose every slice is bright exactly where the labels say ink, the ink a little brighter in
    each deeper slice (so that triplets differ after each slice is centred on its median)."""
    root = tmp_path_factory.mktemp("labelled")
    folder = root / "train" / "1"
    (folder / "surface_volume").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for _ in range(25):
        y, x = rng.integers(0, HEIGHT - 20), rng.integers(0, WIDTH - 20)
        labels[y: y + rng.integers(6, 20), x: x + rng.integers(6, 20)] = 1
    mask = np.ones((HEIGHT, WIDTH), np.uint8)
    mask[:10] = 0  # a strip of no papyrus
    for z in range(40):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif",
                         ((1000 + (20000 + 300 * z) * labels.astype(np.int64) + z) * mask).astype(np.uint16))
    cv2.imwrite(str(folder / "mask.png"), mask * 255)
    cv2.imwrite(str(folder / "inklabels.png"), labels * 255)
    path = root / "1.h5"
    write_store(Fragment(folder), path, z_range=(20, 40), tile_size=64, stride=32, progress=False)
    return path, labels * mask, mask


def test_augmented_tiles_stay_aligned_with_labels(label_store):
    path, _, _ = label_store
    torch.manual_seed(0)
    dataset = TileDataset([path], tile_size=64, stride=32, spec=MEAN, augment=True)
    assert len(dataset) > 10
    agree = total = 0
    for i in range(len(dataset)):
        image, label = tile(dataset, i)
        assert image.shape == (3, 64, 64) and label.shape == (1, 64, 64)
        assert image.dtype == torch.float32 and set(label.unique().tolist()) <= {0.0, 1.0}
        bright = image.mean(0) > 1.0  # the papyrus centres on 0.5, ink voxels sit about 1 above it
        agree += (bright == (label[0] > 0)).sum().item()
        total += label.numel()
    # rotations, flips and the affine warp all keep image and label on the same pixels;
    # only interpolated edges of the affine warp may disagree
    assert agree / total > 0.97


def test_training_slices_come_from_the_centre_with_a_small_shift(label_store):
    path, _, _ = label_store
    dataset = TileDataset([path], tile_size=64, stride=32, spec=MEAN, augment=True, max_depth_shift=2)
    torch.manual_seed(1)
    firsts = {dataset.choose_slices()[0] for _ in range(300)}
    assert min(firsts) >= CENTRE_SLICES[0] - 2 and max(firsts) + 2 <= CENTRE_SLICES[-1] + 2
    assert len(firsts) >= 6  # the start really varies


def test_flattened_training_slices_are_the_surface_triplets(label_store):
    path, _, _ = label_store
    spec = InputSpec("triplets", centre_on="tile", triplets="tile")
    dataset = TileDataset([path], tile_size=64, stride=32, spec=spec, augment=True, max_depth_shift=0)
    torch.manual_seed(1)
    firsts = {dataset.choose_slices()[0] for _ in range(100)}
    assert firsts == {CENTRE_SLICES[t[0]] for t in SURFACE_TRIPLETS}
    image, label = tile(dataset, 0)
    assert image.shape == (3, 64, 64) and label.shape == (1, 64, 64) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="centre_on 'surface'"):
        InputSpec("triplets", centre_on="surface")


def test_stack_tiles_are_the_window_moved_by_the_depth_jitter(label_store):
    path, _, _ = label_store
    dataset = TileDataset([path], 64, 32, spec=STACK, augment=True, max_depth_shift=1)
    torch.manual_seed(0)
    windows = {tuple(dataset.choose_slices()) for _ in range(100)}
    assert windows == {tuple(range(29 + s, 35 + s)) for s in (-1, 0, 1)}
    image, label = tile(dataset, 0)
    assert image.shape == (6, 64, 64) and label.shape == (1, 64, 64)
    assert TileDataset([path], 64, 32, spec=STACK, augment=False).choose_slices() == list(range(29, 35))


def test_a_flattened_read_moves_the_slices_onto_the_surface(tmp_path):
    """On a sheet whose surface sits 3 slices above 32, flattened slices 31..33 are the stored slices 34..36."""
    store = flat_surface_store(tmp_path, 3.0)
    reader = InputReader(store)
    flat = reader.read(16, 16, 64, [31, 32, 33], "tile")
    stored = reader.read(16, 16, 64, [34, 35, 36])
    assert flat.shape == (3, 64, 64)
    assert np.abs(flat - stored).mean() < 0.25 * np.abs(stored - reader.read(16, 16, 64, [31, 32, 33])).mean()


def test_skip_and_only_rows_select_tiles(label_store):
    path, _, _ = label_store
    full = TileDataset([path], 64, 32, MEAN, augment=False)
    skipped = TileDataset([path], 64, 32, MEAN, augment=False, skip_rows={path: (80, 140)})
    only = TileDataset([path], 64, 32, MEAN, augment=False, only_rows={path: (80, 140)})
    assert all(y + 64 <= 80 or y >= 140 for _, y, _ in skipped.items)
    assert all(80 <= y + 32 < 140 for _, y, _ in only.items)
    assert 0 < len(skipped.items) < len(full.items) and 0 < len(only.items) < len(full.items)


def test_equal_area_bands_and_folds():
    mask = np.zeros((100, 50), np.uint8)
    mask[10:90, 5:45] = 1
    bands = equal_area_bands(mask, 4)
    assert bands[0][0] == 0 and bands[-1][1] == 100
    areas = [mask[y0:y1].sum() for y0, y1 in bands]
    assert max(areas) - min(areas) <= 40  # one row of mask at most
    folds = make_folds(["1", "2", "3"], ("2", 2), {"2": mask})
    assert [f.name for f in folds] == ["1", "2.1", "2.2", "3"]
    assert folds[0] == Fold("1", "1", None) and folds[2].fragment_id == "2" and folds[2].rows == equal_area_bands(mask, 2)[1]
    assert all(Fold.from_dict(f.as_dict()) == f for f in folds)
    dotted = make_folds(["1", "3.v2"])  # a dot in a fragment id is just a character
    assert [(f.name, f.fragment_id) for f in dotted] == [("1", "1"), ("3.v2", "3.v2")]
    with pytest.raises(ValueError, match="2.1"):
        make_folds(["2", "2.1"], ("2", 2), {"2": mask})


class PointwiseModel(torch.nn.Module):
    """A 1x1 convolution: its output rotates with its input, so rot90 TTA must change nothing."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        return self.conv(x) * 4


class ConstantModel(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), float(np.log(0.7 / 0.3)))


def test_tta_on_an_equivariant_model_changes_nothing(label_store):
    path, labels, mask = label_store
    store = Store(path)
    plain = predict_fragment(PointwiseModel(), store, 64, 32, tta=False, spec=MEAN)
    tta = predict_fragment(PointwiseModel(), store, 64, 32, batch_size=3, tta=True, spec=MEAN)
    assert plain.shape == (HEIGHT, WIDTH) and plain.dtype == np.float32
    np.testing.assert_allclose(tta, plain, atol=1e-5)
    # the volume spells the labels, so even this toy model separates ink from papyrus
    inside = mask > 0
    assert abs(np.corrcoef(plain[inside], labels[inside])[0, 1]) > 0.9


def test_blending_leaves_no_seams_and_masks_the_map(label_store):
    path, _, mask = label_store
    prob = predict_fragment(ConstantModel(), Store(path), 64, 24, tta=True, spec=MEAN)
    np.testing.assert_allclose(prob[mask > 0], 0.7, atol=1e-5)  # every pixel, overlap or not
    assert (prob[mask == 0] == 0).all()


def test_blend_weights_are_positive_and_peak_in_the_centre():
    weights = blend_weights(64)
    assert weights.min() > 0 and weights[32, 32] == weights.max()
    np.testing.assert_allclose(weights, weights.T)


def test_packed_windows_match_the_store_at_every_offset(label_store):
    path, labels, _ = label_store
    dataset = TileDataset([path], tile_size=64, stride=32, spec=MEAN, augment=False)
    store = Store(path)
    for y, x in [(0, 0), (13, 5), (150, 117), (HEIGHT - 64, WIDTH - 64), (HEIGHT - 30, WIDTH - 21)]:
        np.testing.assert_array_equal(dataset.labels[0].window(y, x, 64), store.read_window("labels", y, x, 64, 64))
        np.testing.assert_array_equal(dataset.readers[0].mask.window(y, x, 64), store.read_window("mask", y, x, 64, 64))


def test_inputs_fill_the_outside_with_the_in_mask_median_and_centre_each_slice(label_store):
    """No step at the fragment's border: outside the mask each slice reads as its in-mask median; then each slice of
    the tile is shifted so that its median sits at 0.5 (differences inside a slice are kept as they are)."""
    path, _, mask = label_store
    store = Store(path)
    y, x = HEIGHT - 30, WIDTH - 21  # a corner tile, partly past the image and outside the mask
    slices = [30, 31, 32]
    tile = InputReader(store).read(y, x, 64, slices)
    outside = store.read_window("mask", y, x, 64, 64) == 0
    assert outside.any() and (~outside).any()
    median = np.median(store.read_tile(0, 0, HEIGHT, WIDTH, slices)[:, mask > 0], axis=1)
    fill = normalise(median.astype(np.float32), store.intensity_range())
    inside = normalise(store.read_tile(y, x, 64, 64, slices), store.intensity_range())
    for k in range(3):
        np.testing.assert_allclose(tile[k][outside], tile[k][outside][0])  # one value outside, per slice
        shift = tile[k][outside][0] - fill[k]
        np.testing.assert_allclose(tile[k][~outside], inside[k][~outside] + shift, atol=0.03)
        assert np.median(tile[k][::4, ::4]) == pytest.approx(0.5, abs=1e-6)


def test_photometric_draws_per_tile_and_keeps_the_shape():
    images = torch.rand(6, 3, 32, 32)
    torch.manual_seed(0)
    out = photometric(images, noise=0.0)
    assert out.shape == images.shape
    # without noise each tile is an affine map of itself, with its own gain: the per-tile spreads differ
    gains = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    assert gains.min() >= 0.8 - 1e-4 and gains.max() <= 1.2 + 1e-4 and gains.std() > 0.01
    torch.manual_seed(0)
    assert torch.equal(photometric(images, noise=0.0), out)  # deterministic given the seed


def test_an_ensemble_in_one_pass_equals_the_weighted_sum_of_its_models(label_store):
    path, _, _ = label_store
    store = Store(path)
    first, second, third = PointwiseModel(), ConstantModel(), PointwiseModel(STACK.depth)
    members = [(first, 0.25, MEAN), (second, 0.25, MEAN), (third, 0.5, STACK)]  # two families, one read
    together = predict_fragment(members, store, 64, 32, batch_size=2, tta=True)
    apart = [predict_fragment(m, store, 64, 32, batch_size=5, tta=True, spec=spec, readers=0) for m, _, spec in members]
    np.testing.assert_allclose(together, 0.25 * apart[0] + 0.25 * apart[1] + 0.5 * apart[2], atol=1e-5)
    # the inputs made on the model's device from raw reads (a GPU's way) are the same
    np.testing.assert_array_equal(predict_fragment(members, store, 64, 32, batch_size=2, on_device=True), together)
    with pytest.raises(ValueError, match="different ways"):
        predict_fragment([(first, 0.5, MEAN), (third, 0.5, InputSpec("stack", 6, "tile"))], store, 64, 32)


def test_stack_views_are_the_window_and_its_depth_shifts():
    spec = InputSpec("stack", depth=4, centre_on="tile")
    slices, views, combine = spec.views(tta=True)
    assert slices == list(range(29, 35)) and combine == "mean"
    assert [[slices[i] for i in view] for view in views] == [[29, 30, 31, 32], [30, 31, 32, 33], [31, 32, 33, 34]]
    assert spec.views(tta=False) == ([30, 31, 32, 33], [[0, 1, 2, 3]], "mean")
    together, own = member_views([spec, InputSpec("triplets", centre_on="tile", triplets="tile")], tta=True)
    assert together == list(range(28, 36))  # one read serves both: the union of their slices
    assert [[together[i] for i in view] for view in own[1][0]] == [[31, 32, 33], [32, 33, 34], [33, 34, 35]]


def test_augmentation_is_deterministic_given_the_seed(label_store):
    path, _, _ = label_store
    dataset = TileDataset([path], tile_size=64, stride=32, spec=MEAN, augment=True)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append([tile(dataset, i) for i in range(6)])
    for (image_a, label_a), (image_b, label_b) in zip(*draws):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    torch.manual_seed(4)
    assert not all(torch.equal(tile(dataset, i)[0], image) for i, (image, _) in enumerate(draws[0]))


def test_tricks_z_reversal_cutmix_and_cutout(label_store):
    path, _, _ = label_store
    torch.manual_seed(0)
    reversed_ = TileDataset([path], 64, 32, MEAN, augment=True, z_reverse=1.0)
    slices = reversed_.choose_slices()
    assert slices == sorted(slices, reverse=True) and slices[0] - slices[2] == 2
    # cutmix pastes image and label together, from the next tile of the batch: they stay aligned
    mixed = TileDataset([path], 64, 32, MEAN, augment=True, cutmix=1.0)
    images, labels = tiles(mixed, range(len(mixed)))
    assert ((images.mean(1) > 0.5) == (labels[:, 0] > 0)).float().mean() > 0.97
    images, labels = torch.rand(3, 2, 16, 16), torch.rand(3, 1, 16, 16)
    mixed_images, mixed_labels = images.clone(), labels.clone()
    paste_boxes(mixed_images, mixed_labels, torch.tensor([[2, 6, 3, 9], [-1, -1, -1, -1], [0, 16, 0, 4]]))
    for got, was in ((mixed_images, images), (mixed_labels, labels)):
        assert torch.equal(got[0, :, 2:6, 3:9], was[1, :, 2:6, 3:9]) and torch.equal(got[1], was[1])
        assert torch.equal(got[2, :, :, :4], was[0, :, :, :4]) and torch.equal(got[2, :, :, 4:], was[2, :, :, 4:])
        assert (got[0] != was[0]).sum() == was.shape[1] * 24
    # cutout blanks boxes of the image (the label is left alone)
    images = torch.rand(2, 3, 64, 64)
    boxes = torch.tensor([[[5, 15, 20, 30], [-1, -1, -1, -1]], [[0, 8, 0, 12], [30, 40, 30, 46]]])
    cut = images.clone()
    blank_boxes(cut, boxes)
    for k, count in enumerate([100, 96 + 160]):
        blanked = (cut[k] != images[k]).any(0)
        assert blanked.sum() == count
        assert torch.allclose(cut[k][:, blanked], images[k].mean()) and torch.equal(cut[k][:, ~blanked], images[k][:, ~blanked])


def test_merge_tta_mean_and_max_over_triplets():
    rotations = (0, 1, 2, 3)
    per_triplet = torch.tensor([0.2, 0.5, 0.8])  # tile 0; tile 1 gets 1 - these
    probs = torch.stack([torch.stack([torch.full((1, 8, 8), float(v if b == 0 else 1 - v)) for _ in rotations])
                         for b in range(2) for v in per_triplet]).flatten(0, 1)
    assert probs.shape == (2 * 3 * 4, 1, 8, 8)
    mean = merge_tta(probs, 2, TRIPLETS, rotations, "mean")
    maximum = merge_tta(probs, 2, TRIPLETS, rotations, "max")
    np.testing.assert_allclose(mean[:, 0, 0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(maximum[:, 0, 0], [0.8, 0.8], atol=1e-6)


def flat_surface_store(folder, offset):
    """A store (slices 24:40) of a small synthetic fragment whose surface is flat at slice 32 + offset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lib.synth.DEPTH_STD", 0.0)
        rng = np.random.default_rng(0)
        fields = FragmentFields(rng, (96, 96), FragmentLevel(0.1, offset, 16, 3))
        write_fragment(folder / "frag", fields, rng, 65, with_labels=True, progress=False)
    write_store(Fragment(folder / "frag"), folder / "frag.h5", z_range=(24, 40), tile_size=64, stride=32, progress=False)
    return Store(folder / "frag.h5")


@pytest.mark.parametrize("offset, shift", [(3.0, 3), (-2.2, -2), (0.0, 0), (-9.0, -4), (9.0, 4)])
def test_surface_shift_finds_the_fragment_surface(tmp_path, offset, shift):
    """From the in-mask median intensity along z (the generator keeps the surface within 4 slices of 32); never
    past the store's slices (28..35 can move -4..+4 in 24:40)."""
    store = flat_surface_store(tmp_path, offset)
    assert surface_shift(store) == shift and store.fragment_surface_confidence > 0.5
    assert InputSpec("triplets", triplets="surface").read_mode() == "fragment"


def tilted_volume(height=64, width=96, z_start=24, num_slices=16, noise=0.0, seed=0):
    """(Z, H, W) float32: papyrus (1) below a surface that climbs from slice 29 to 35 across the width, air (0)
    above it, with the synthetic generator's soft edge; and that surface's depth (H, W)."""
    depth = np.broadcast_to(29 + 6 * np.arange(width, dtype=np.float32) / (width - 1), (height, width))
    z = np.arange(z_start, z_start + num_slices, dtype=np.float32)[:, None, None]
    volume = 1 / (1 + np.exp((z - depth) / 0.7))
    volume += noise * np.random.default_rng(seed).standard_normal(volume.shape)
    return volume.astype(np.float32), depth


def test_the_surface_map_follows_a_tilted_surface_and_flatten_puts_it_on_slice_32():
    volume, depth = tilted_volume(noise=0.04)
    grid, confidence = surface_grid(volume, np.ones(depth.shape, np.uint8), 24, 32.0, contrast=1.0)
    assert confidence.min() > 0.9
    found = pixel_window(lambda cells: grid[cells], grid.shape, 0, 0, 96)[:64]
    assert found.shape == depth.shape and np.abs(found - depth)[8:-8, 8:-8].max() < 0.15
    flat = flatten(volume, 24, found, [30, 32, 34])
    # 2 slices into the papyrus, at the edge (half way), 2 slices into the air: the same everywhere along the tilt
    assert np.abs(flat[:, 8:-8, 8:-8].mean(axis=(1, 2)) - [0.94, 0.5, 0.06]).max() < 0.03
    assert np.abs(flat[1, 8:-8, 8:-8].mean(axis=0) - 0.5).max() < 0.06
    # without flattening slice 32 runs from papyrus to air across the tile
    assert volume[32 - 24, :, 0].mean() < 0.1 and volume[32 - 24, :, -1].mean() > 0.9


def test_triplet_modes_on_a_real_store(label_store):
    path, _, mask = label_store
    store = Store(path)
    spec = {mode: InputSpec("triplets", centre_on="nominal", triplets=mode) for mode in TRIPLET_MODES}
    assert spec["middle"].views() == (list(CENTRE_SLICES), [(2, 3, 4)], "mean")
    assert spec["max"].views()[2] == "max" and spec["mean"].views()[0] == list(CENTRE_SLICES)
    maps = {mode: predict_fragment(PointwiseModel(), store, 64, 32, tta=False, spec=spec[mode]) for mode in TRIPLET_MODES}
    for mode, prob in maps.items():
        assert prob.shape == (HEIGHT, WIDTH) and (prob[mask == 0] == 0).all() and 0 <= prob.min() <= prob.max() <= 1, mode
    # the max of the triplets is never below their mean
    assert (maps["max"] >= maps["mean"] - 1e-6).all() and (maps["max"] > maps["mean"] + 1e-6).any()
    with pytest.raises(ValueError, match="triplets 'any' is not one of"):
        InputSpec("triplets", triplets="any")
