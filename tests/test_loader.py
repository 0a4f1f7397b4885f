"""The model inputs' fast paths (lib/inputs.py, lib/data.py: numpy per tile in the loader, and torch on a batch on
the model's device) against straightforward reference implementations: the same arrays, bit for bit, so that the
tiles are the ones the loader made before (bench/README.md, "## loader")."""
import cv2
import numpy as np
import pytest
import torch

from lib.data import TileDataset, geometry_pixels, model_batch, random_geometry, take_batch_pixels, take_pixels
from lib.depth import NOMINAL_SURFACE
from lib.fragments import Fragment
from lib.inputs import InputSpec, batch_median, channel_median, finish_batch, flatten
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
def test_the_medians_are_numpys_median(count):
    rng = np.random.default_rng(count)
    values = rng.normal(size=(5, count)).astype(np.float32)
    values[1] = np.round(values[1])  # ties
    expected = np.median(values, axis=1)
    np.testing.assert_array_equal(channel_median(values), expected[:, None, None])
    np.testing.assert_array_equal(batch_median(torch.from_numpy(values)).numpy(), expected)


def reference_inputs(volume, z_start, depths, slices, low, high):
    """The model inputs as the module's docstring says them: flattened (reference_flatten), the intensity range
    low..high mapped to 0..1 and clipped to -0.5..1.5, each slice's median over every 4th pixel moved to 0.5."""
    tile = np.clip((reference_flatten(volume, z_start, depths, slices) - np.float32(low)) *
                   np.float32(1 / (high - low)), -0.5, 1.5)
    return tile + (0.5 - np.median(tile[:, ::4, ::4].reshape(len(slices), -1), axis=1))[:, None, None]


@pytest.mark.parametrize("slices", [list(range(25, 39)), list(range(38, 24, -1)), [26, 30, 31, 37], [32, 33, 34]])
def test_finish_batch_equals_the_reference_and_clamps_to_the_volume(slices):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 65535, (2, 16, 40, 48), dtype=np.uint16)
    # a tilted surface reaching below and above the volume's slices 24..39 at the window's ends; and a flat one
    depths = np.stack([28 + 9 * np.linspace(0, 1, 48)[None] + rng.random((40, 48)) - 0.5,
                       np.full((40, 48), 33)]).astype(np.float32)
    offsets = np.asarray(slices) - NOMINAL_SURFACE - 24
    scale = np.array([[1000, 1 / 60000], [0, 1 / 65535]], np.float32)
    got = finish_batch(*(torch.from_numpy(a) for a in (volume, depths, np.stack([offsets, offsets]), scale))).numpy()
    for k, (low, high) in enumerate([(1000, 61000), (0, 65535)]):
        np.testing.assert_allclose(got[k], reference_inputs(volume[k], 24, depths[k], slices, low, high), atol=1e-6)


@pytest.mark.parametrize("size", [64, 45])
def test_the_geometry_moves_image_and_label_as_cv2_warps_them(size):
    rng = np.random.default_rng(size)
    image = rng.random((4, size, size), dtype=np.float32)
    label = (rng.random((size, size)) > 0.5).astype(np.uint8)
    torch.manual_seed(0)
    for _ in range(64):  # every flip and turn, with and without the warp
        geometry = random_geometry(size)
        pixels = geometry_pixels(size, geometry)
        expected = reference_geometry(image, label, geometry)
        for got, want in zip((take_pixels(image, pixels), take_pixels(label, pixels)), expected):
            assert got.flags.c_contiguous and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        on_batch = [take_batch_pixels(torch.from_numpy(a)[None, None] if a.ndim == 2 else torch.from_numpy(a)[None],
                                      torch.from_numpy(pixels)[None]) for a in (image, label)]
        np.testing.assert_array_equal(on_batch[0][0].numpy(), expected[0])
        np.testing.assert_array_equal(on_batch[1][0, 0].numpy(), expected[1])


@pytest.fixture(scope="module")
def synth_store(synth_root, tmp_path_factory):
    """A store of synthetic fragment 1: a sheet whose surface is found, its mask's border inside some tiles."""
    path = tmp_path_factory.mktemp("loader") / "1.h5"
    write_store(Fragment(synth_root / "train" / "1"), path, tile_size=64, stride=32, progress=False)
    return path


@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "on-device"])
@pytest.mark.parametrize("spec", [InputSpec(depth=12), InputSpec(depth=12, centre_on="nominal"),
                                  InputSpec("triplets"), InputSpec("triplets", centre_on="nominal")],
                         ids=["stack-tile", "stack-nominal", "triplets-tile", "triplets-nominal"])
def test_augmented_tiles_are_the_read_tiles_augmented_as_before(synth_store, spec, on_device):
    """The loader resamples the geometry with the read (only the pixels kept are flattened and normalised), or
    leaves the read's finishing and the geometry to model_batch: either way the same tiles as reading the whole tile
    and warping it afterwards, the same random draws in the same order."""
    dataset = TileDataset([synth_store], 64, 32, spec, augment=True, z_reverse=0.5, on_device=on_device)
    reader = dataset.readers[0]
    outside = flattened = 0
    for i in range(len(dataset)):
        torch.manual_seed(i)
        image, label = model_batch(torch.utils.data.default_collate([dataset[i]]), "cpu")
        torch.manual_seed(i)
        slices = dataset.choose_slices()
        assert torch.rand(()) >= 0 and torch.rand(()) >= 0  # the cutmix and cutout draws, both off
        _, y, x = dataset.items[i]
        expected = reference_geometry(reader.read(y, x, 64, slices, spec.centre_on),
                                      dataset.labels[0].window(y, x, 64), random_geometry(64))
        np.testing.assert_array_equal(image[0].numpy(), expected[0])
        np.testing.assert_array_equal(label[0, 0].numpy(), expected[1])
        outside += int(reader.mask.window(y, x, 64).min() == 0)
        flattened += reader.tile_depths(y, x, 64) is not None
    assert len(dataset) > 20 and outside > 0  # tiles on the mask's border were among them
    assert flattened > len(dataset) / 2  # most tiles have a surface to flatten onto


def test_stores_of_fewer_slices_batch_with_the_others(synth_root, synth_store, tmp_path):
    """A store of 12 slices beside one of 16: its tiles are padded to batch with the others', and come out as its
    own reader reads them."""
    shallow = tmp_path / "shallow.h5"
    write_store(Fragment(synth_root / "train" / "1"), shallow, z_range=(26, 38), tile_size=64, stride=32,
                progress=False)
    spec = InputSpec(depth=12, centre_on="nominal")
    dataset = TileDataset([synth_store, shallow], 64, 32, spec, augment=False, on_device=True)
    first_shallow = next(i for i, item in enumerate(dataset.items) if item[0] == 1)
    chosen = [0, first_shallow, first_shallow + 1]
    images, _ = model_batch(torch.utils.data.default_collate([dataset[i] for i in chosen]), "cpu")
    for image, i in zip(images, chosen):
        index, y, x = dataset.items[i]
        np.testing.assert_array_equal(image.numpy(), dataset.readers[index].read(y, x, 64, list(spec.window)))
    assert dataset[first_shallow]["layers"].shape[0] == 16
