"""lib.fragments: listing, lazy opening, exact 16-bit band reads in every TIFF layout, PNG rules, and one-line
errors naming the file for every kind of broken fragment (library and CLI)."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from lib.fragments import Fragment, FragmentError, list_fragments, open_split

REPO = Path(__file__).resolve().parents[1]


def copy_fragment(synth_root, dest_root, split="train", fragment_id="1", name=None):
    """A private copy of one fragment of the shared dataset, at dest_root/split/(name or id)."""
    dest = Path(dest_root) / split / (name or fragment_id)
    shutil.copytree(Path(synth_root) / split / fragment_id, dest)
    return dest


def slice_path(folder, z):
    return Path(folder) / "surface_volume" / f"{z:02d}.tif"


def run_cli(root):
    return subprocess.run([sys.executable, "-m", "lib.fragments", str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_naming(message, path):
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    assert str(path) in message, f"message does not name {path}: {message!r}"


# ---------------------------------------------------------------- listing and opening


def test_lists_fragment_ids(synth_root):
    assert list_fragments(synth_root, "train") == ["1", "2", "3"]
    assert list_fragments(synth_root, "test") == ["a", "b"]
    assert [f.fragment_id for f in open_split(synth_root, "test", ids=["b", "zzz"])] == ["b"]
    train = open_split(synth_root, "train")
    assert [(f.split, f.num_slices, f.dtype, f.has_labels) for f in train] == [("train", 65, np.uint16, True)] * 3
    assert all(not f.has_labels for f in open_split(synth_root, "test"))


def test_split_without_fragments_names_the_folder(tmp_path):
    (tmp_path / "train" / "stray_folder").mkdir(parents=True)  # a folder, but no surface_volume in it
    with pytest.raises(FragmentError) as err:
        list_fragments(tmp_path, "train")
    assert_one_line_naming(str(err.value), tmp_path / "train")
    with pytest.raises(FragmentError) as err:
        list_fragments(tmp_path, "test")  # no split folder at all
    assert_one_line_naming(str(err.value), tmp_path / "test")


def test_open_reads_headers_only(synth_root, tmp_path, monkeypatch):
    frag_dir = copy_fragment(synth_root, tmp_path)
    slice_path(frag_dir, 5).write_bytes(b"not a tiff")  # only validate() may notice: opening reads one header

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel data read while opening a fragment")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    monkeypatch.setattr(tifffile, "memmap", no_pixels)
    monkeypatch.setattr(tifffile, "imread", no_pixels)
    monkeypatch.setattr(zarr, "open", no_pixels)
    fragment = Fragment(frag_dir)
    expected_shape = Image.open(frag_dir / "mask.png").size[::-1]
    assert (fragment.shape, fragment.dtype, fragment.num_slices) == (expected_shape, np.uint16, 65)
    monkeypatch.undo()
    with pytest.raises(FragmentError, match="05.tif"):
        fragment.validate()


# ---------------------------------------------------------------- exact band reads in every TIFF layout


def full_range_pattern(shape):
    """Every 16-bit value class, odd low bits included."""
    h, w = shape
    return ((np.arange(h * w, dtype=np.uint64) * 7919 + 13) % 65536).astype(np.uint16).reshape(h, w)


LAYOUTS = {
    "uncompressed": {},
    "zlib_strips16": {"compression": "zlib", "rowsperstrip": 16},
    "lzw_strips16": {"compression": "lzw", "rowsperstrip": 16},
    "zlib_tiles64": {"compression": "zlib", "tile": (64, 64)},
}


@pytest.fixture(scope="module")
def layout_root(synth_root, tmp_path_factory):
    """One 3-slice fragment per TIFF layout: 00 = full-range pattern, 01 = synthetic slice 32, 02 = slice 40."""
    root = tmp_path_factory.mktemp("layouts")
    source = Fragment.open(synth_root, "train", "1")
    originals = [full_range_pattern(source.shape)] + [source.read_band(z, 0, source.shape[0]) for z in (32, 40)]
    for layout, kwargs in LAYOUTS.items():
        frag_dir = root / "train" / layout
        (frag_dir / "surface_volume").mkdir(parents=True)
        for z, pixels in enumerate(originals):
            tifffile.imwrite(slice_path(frag_dir, z), pixels, **kwargs)
        for name in ("mask.png", "inklabels.png", "ir.png"):
            shutil.copy(source.path / name, frag_dir / name)
    return root, originals


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_read_band_is_exact_16_bit(layout_root, layout):
    root, originals = layout_root
    fragment = Fragment.open(root, "train", layout).validate()
    with tifffile.TiffFile(fragment.slice_paths[0]) as tif:  # the file really has the layout under test
        page = tif.pages[0]
        assert page.is_tiled == ("tile" in LAYOUTS[layout])
        assert (page.compression == 1) == (layout == "uncompressed")
    h = fragment.shape[0]
    assert fragment.num_slices == 3
    for z, original in enumerate(originals):
        on_disk = tifffile.imread(fragment.slice_paths[z])
        assert np.array_equal(on_disk, original)
        whole = fragment.read_band(z, 0, fragment.shape[0])
        assert whole.dtype == np.uint16 and whole.shape == fragment.shape
        assert np.array_equal(whole, original)
        assert whole.max() > 255
        for y0, y1 in [(0, 1), (0, 16), (15, 17), (17, 45), (63, 129), (100, 200), (h - 5, h), (0, h)]:
            band = fragment.read_band(z, y0, y1)
            assert type(band) is np.ndarray  # a copy, not a view of a file mapping
            assert band.dtype == np.uint16 and band.shape == (y1 - y0, fragment.shape[1])
            assert np.array_equal(band, original[y0:y1]), (layout, z, y0, y1)
    assert originals[0].max() == 65535 and np.array_equal(fragment.read_band(0, 0, h) & 1, originals[0] & 1)


@pytest.mark.parametrize("layout", ["zlib_strips16", "lzw_strips16", "zlib_tiles64"])
def test_read_band_decodes_only_the_chunks_it_needs(layout_root, tmp_path, layout):
    """Spoil the first strip or tile: a band far below it still reads exactly; the whole slice is a FragmentError."""
    root, originals = layout_root
    frag_dir = tmp_path / "train" / layout
    shutil.copytree(root / "train" / layout, frag_dir)
    path = slice_path(frag_dir, 1)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset: offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    fragment = Fragment(frag_dir)
    assert np.array_equal(fragment.read_band(1, 128, 190), originals[1][128:190])
    with pytest.raises(FragmentError) as err:
        fragment.read_band(1, 0, fragment.shape[0])
    assert_one_line_naming(str(err.value), path)


def test_big_endian_tiff_reads_as_native_uint16(tmp_path):
    pixels = full_range_pattern((40, 30))
    (tmp_path / "f" / "surface_volume").mkdir(parents=True)
    tifffile.imwrite(slice_path(tmp_path / "f", 0), pixels, byteorder=">")
    tifffile.imwrite(slice_path(tmp_path / "f", 1), pixels, byteorder=">", compression="zlib")
    fragment = Fragment(tmp_path / "f")
    for z in (0, 1):
        band = fragment.read_band(z, 3, 17)
        assert band.dtype == np.dtype(np.uint16) and band.dtype.isnative
        assert np.array_equal(band, pixels[3:17])


def test_float_slices_are_refused(tmp_path):
    (tmp_path / "f" / "surface_volume").mkdir(parents=True)
    for z in (0, 1):
        tifffile.imwrite(slice_path(tmp_path / "f", z), np.zeros((20, 30), np.float32))
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(tmp_path / "f" / "mask.png")
    with pytest.raises(FragmentError, match="8- or 16-bit unsigned integers, got float32") as err:
        Fragment(tmp_path / "f", "test").validate()
    assert_one_line_naming(str(err.value), slice_path(tmp_path / "f", 0))


def test_other_slice_counts(synth_root, tmp_path):
    frag_dir = tmp_path / "train" / "short"
    (frag_dir / "surface_volume").mkdir(parents=True)
    source = Path(synth_root) / "train" / "1"
    for z in range(20):
        shutil.copy(slice_path(source, z), slice_path(frag_dir, z))
    for name in ("mask.png", "inklabels.png"):
        shutil.copy(source / name, frag_dir / name)
    fragment = Fragment(frag_dir).validate()
    assert fragment.num_slices == 20
    assert np.array_equal(fragment.read_band(19, 0, fragment.shape[0]), tifffile.imread(slice_path(source, 19)))
    with pytest.raises(IndexError):
        fragment.read_band(20, 0, fragment.shape[0])


# ---------------------------------------------------------------- PNG rules


def test_png_masks_and_labels(synth_root, tmp_path):
    frag_dir = copy_fragment(synth_root, tmp_path)
    fragment = Fragment(frag_dir)
    h, w = fragment.shape
    rng = np.random.default_rng(0)
    values = rng.choice(np.array([0, 1, 7, 128, 255], np.uint8), size=(h, w))

    Image.fromarray(values).save(frag_dir / "mask.png")  # 8-bit grey: nonzero means 1
    mask = fragment.read_mask()
    assert mask.dtype == np.uint8 and np.array_equal(mask, (values != 0).astype(np.uint8))

    rgb = np.stack([values, np.full_like(values, 255), np.zeros_like(values)], axis=-1)
    Image.fromarray(rgb).save(frag_dir / "mask.png")  # 3 channels: the first one counts
    assert np.array_equal(fragment.read_mask(), (values != 0).astype(np.uint8))

    wide = values.astype(np.uint16) * 256  # 16-bit label PNG: 256 is ink, not 0 after a byte cut
    Image.fromarray(wide).save(frag_dir / "inklabels.png")
    assert Image.open(frag_dir / "inklabels.png").mode.startswith("I")
    assert np.array_equal(fragment.read_labels(), (values != 0).astype(np.uint8))

    (frag_dir / "ir.png").write_bytes(b"not a PNG")  # the infrared photo is never read: not a source of the store
    fragment.validate()  # all of the above are valid files
    assert frag_dir / "ir.png" not in fragment.source_files()


# ---------------------------------------------------------------- broken fragments


def _replace_slice(frag_dir, z, pixels):
    tifffile.imwrite(slice_path(frag_dir, z), pixels)
    return slice_path(frag_dir, z)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_shape(frag_dir):
    return Image.open(frag_dir / "mask.png").size[::-1]


def break_missing_slice(d):
    slice_path(d, 10).unlink()
    return d / "surface_volume"


def break_slice_shape(d):
    h, w = _png_shape(d)
    return _replace_slice(d, 7, np.zeros((h - 1, w), np.uint16))


def break_slice_dtype_uint8(d):
    return _replace_slice(d, 7, tifffile.imread(slice_path(d, 7)).astype(np.uint8))


def break_slice_dtype_float32(d):
    return _replace_slice(d, 64, tifffile.imread(slice_path(d, 64)).astype(np.float32))


def break_mask_shape(d):
    h, w = _png_shape(d)
    Image.fromarray(np.full((h, w + 3), 255, np.uint8)).save(d / "mask.png")
    return d / "mask.png"


def break_labels_shape(d):
    h, w = _png_shape(d)
    Image.fromarray(np.zeros((h + 2, w), np.uint8)).save(d / "inklabels.png")
    return d / "inklabels.png"


def break_garbage_tiff(d):
    slice_path(d, 30).write_bytes(b"\x00garbage" * 500)
    return slice_path(d, 30)


def break_garbage_first_tiff(d):
    slice_path(d, 0).write_bytes(b"II*\x00" + b"\xfe" * 100)  # a TIFF signature, then nonsense
    return slice_path(d, 0)


def break_truncated_tiff(d):
    return _truncate(slice_path(d, 40))


def break_truncated_mask(d):
    return _truncate(d / "mask.png")


def break_garbage_mask(d):
    (d / "mask.png").write_bytes(b"\x89PNG not really")
    return d / "mask.png"


def break_truncated_labels(d):
    return _truncate(d / "inklabels.png")


def break_empty_mask(d):
    Image.fromarray(np.zeros(_png_shape(d), np.uint8)).save(d / "mask.png")
    return d / "mask.png"


def break_missing_mask(d):
    (d / "mask.png").unlink()
    return d / "mask.png"


def break_missing_labels(d):
    (d / "inklabels.png").unlink()
    return d / "inklabels.png"


def break_no_slices(d):
    for p in (d / "surface_volume").iterdir():
        p.unlink()
    return d / "surface_volume"


BREAKERS = [
    break_missing_slice, break_slice_shape, break_slice_dtype_uint8, break_slice_dtype_float32, break_mask_shape,
    break_labels_shape, break_garbage_tiff, break_garbage_first_tiff, break_truncated_tiff, break_truncated_mask,
    break_garbage_mask, break_truncated_labels, break_empty_mask, break_missing_mask, break_missing_labels,
    break_no_slices,
]
CLI_CASES = {break_missing_slice, break_slice_dtype_float32, break_truncated_tiff, break_garbage_mask, break_empty_mask}


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: b.__name__[len("break_"):])
def test_broken_fragment_is_a_one_line_error_naming_the_file(synth_root, tmp_path, breaker):
    frag_dir = copy_fragment(synth_root, tmp_path)
    Fragment(frag_dir).validate()  # the copy is fine before we break it
    culprit = breaker(frag_dir)
    with pytest.raises(FragmentError) as err:
        Fragment(frag_dir).validate()
    assert_one_line_naming(str(err.value), culprit)
    with pytest.raises(FragmentError) as err:
        open_split(tmp_path, "train")
    assert_one_line_naming(str(err.value), culprit)
    if breaker in CLI_CASES:
        copy_fragment(synth_root, tmp_path, "test", "a")
        result = run_cli(tmp_path)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(culprit) in lines[0], result.stderr


def test_cli_split_without_fragments(synth_root, tmp_path):
    copy_fragment(synth_root, tmp_path, "train", "1")
    (tmp_path / "test").mkdir()
    result = run_cli(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "test") in lines[0], result.stderr


def test_cli_on_a_good_dataset(synth_root):
    result = run_cli(synth_root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines.pop(4) == "test: 2 fragments" and lines.pop(0) == "train: 3 fragments"
    assert [line.split(":")[0] for line in lines] == ["train/1", "train/2", "train/3", "test/a", "test/b"]
    assert all(line.endswith(": ok") and "65 slices of" in line and "uint16" in line for line in lines)
    assert all("ink" in line for line in lines[:3]) and not any("ink" in line for line in lines[3:])
