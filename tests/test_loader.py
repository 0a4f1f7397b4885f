"""The training loader's fast paths (lib/inputs.py, lib/data.py) against straightforward reference implementations:
the same arrays, bit for bit, so that the loader's tiles are the ones it made before (bench/README.md, "## loader")."""
import cv2
import numpy as np
import pytest
import torch

from lib.data import TileDataset, apply_geometry, random_geometry
from lib.depth import NOMINAL_SURFACE
from lib.fragments import Fragment
from lib.inputs import InputSpec, channel_median, flatten
from lib.store import write_store

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_flatten(volume, z_start, depths, slices):
    """flatten as its docstring says it, one output slice at a time: at each pixel, the layers below and above
    depth + (z - NOMINAL_SURFACE), clamped to the volume, interpolated by the depth's fraction."""
    base = np.floor(depths)
    fraction = (depths - base).astype(np.float32)
    out = []
    for z in slices:
        below = base.astype(np.intp) + (z - NOMINAL_SURFACE - z_start)
        low, high = (np.take_along_axis(volume, np.clip(k, 0, len(volume) - 1)[None], 0)[0].astype(np.float32)
                     for k in (below, below + 1))
        out.append(low + (high - low) * fraction)
    return np.stack(out)


def reference_geometry(image, label, geometry):
    """The geometric augmentation as the loader applied it before: every channel and the label warped by
    cv2.warpAffine (nearest neighbour, 0 outside), then flipped and turned."""
    flip_y, flip_x, turns, matrix = geometry
    if matrix is not None:
        size = (image.shape[2], image.shape[1])
        image = np.stack([cv2.warpAffine(channel, matrix, size, flags=cv2.INTER_NEAREST) for channel in image])
        label = cv2.warpAffine(label, matrix, size, flags=cv2.INTER_NEAREST)
    if flip_y:
        image, label = image[:, ::-1], label[::-1]
    if flip_x:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(np.rot90(image, turns, (1, 2))), np.ascontiguousarray(np.rot90(label, turns))


@pytest.mark.parametrize("slices", [list(range(25, 39)), list(range(38, 24, -1)), [26, 30, 31, 37], [32, 33, 34]])
def test_flatten_equals_the_reference_and_clamps_to_the_volume(slices):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 65535, (16, 40, 48), dtype=np.uint16)
    # a tilted surface reaching below and above the volume's slices 24..39 at the window's ends
    depths = (28 + 9 * np.linspace(0, 1, 48)[None] + rng.random((40, 48)) - 0.5).astype(np.float32)
    expected = reference_flatten(volume, 24, depths, slices)
    np.testing.assert_array_equal(flatten(volume, 24, depths, slices), expected)
    pixels = rng.integers(0, 40 * 48, (7, 9))  # any pixels, in any shape
    np.testing.assert_array_equal(flatten(volume, 24, depths, slices, pixels),
                                  expected.reshape(len(slices), -1)[:, pixels])


@pytest.mark.parametrize("count", [3136, 289, 2, 1])
def test_channel_median_is_numpys_median(count):
    rng = np.random.default_rng(count)
    values = rng.normal(size=(5, count)).astype(np.float32)
    values[1] = np.round(values[1])  # ties
    np.testing.assert_array_equal(channel_median(values), np.median(values, axis=1)[:, None, None])


@pytest.mark.parametrize("size", [64, 45])
def test_the_geometry_moves_image_and_label_as_cv2_warps_them(size):
    rng = np.random.default_rng(size)
    image = rng.random((4, size, size), dtype=np.float32)
    label = (rng.random((size, size)) > 0.5).astype(np.uint8)
    torch.manual_seed(0)
    for _ in range(64):  # every flip and turn, with and without the warp
        geometry = random_geometry(size)
        for got, expected in zip(apply_geometry(image, label, geometry), reference_geometry(image, label, geometry)):
            assert got.flags.c_contiguous and got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def synth_store(synth_root, tmp_path_factory):
    """A store of synthetic fragment 1: a sheet whose surface is found, its mask's border inside some tiles."""
    path = tmp_path_factory.mktemp("loader") / "1.h5"
    write_store(Fragment(synth_root / "train" / "1"), path, tile_size=64, stride=32, progress=False)
    return path


@pytest.mark.parametrize("spec", [InputSpec(depth=12), InputSpec(depth=12, centre_on="nominal"),
                                  InputSpec("triplets"), InputSpec("triplets", centre_on="nominal")],
                         ids=["stack-tile", "stack-nominal", "triplets-tile", "triplets-nominal"])
def test_augmented_tiles_are_the_read_tiles_augmented_as_before(synth_store, spec):
    """The loader resamples the geometry with the read (only the pixels kept are flattened and normalised): the
    same tiles as reading the whole tile and warping it afterwards, the same random draws in the same order."""
    dataset = TileDataset([synth_store], 64, 32, spec, augment=True, z_reverse=0.5)
    reader = dataset.readers[0]
    outside = flattened = 0
    for i in range(len(dataset)):
        torch.manual_seed(i)
        image, label = dataset[i]
        torch.manual_seed(i)
        slices = dataset.choose_slices()
        assert torch.rand(()) >= 0 and torch.rand(()) >= 0  # the cutmix and cutout draws, both off
        _, y, x = dataset.items[i]
        expected = reference_geometry(reader.read(y, x, 64, slices, spec.centre_on),
                                      dataset.labels[0].window(y, x, 64), random_geometry(64))
        np.testing.assert_array_equal(image.numpy(), expected[0])
        np.testing.assert_array_equal(label[0].numpy(), expected[1])
        outside += int(reader.mask.window(y, x, 64).min() == 0)
        flattened += reader.tile_depths(y, x, 64) is not None
    assert len(dataset) > 20 and outside > 0  # tiles on the mask's border were among them
    assert flattened > len(dataset) / 2  # most tiles have a surface to flatten onto
