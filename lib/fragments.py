"""Reader for a dataset root in the Kaggle "vesuvius-challenge-ink-detection" layout or the scroll-segment layout.

    Kaggle:   ROOT/train/<id>/surface_volume/00.tif .. 64.tif, mask.png, inklabels.png, ir.png
              ROOT/test/<id>/surface_volume/..., mask.png
              ROOT/sample_submission.csv
    segments: ROOT/<id>/layers/00.tif .. NN.tif (or 8-bit .jpg / .png), <id>_mask.png, <id>_inklabels.png (if labelled)

Opening a fragment reads only file headers. Slices are read at full 16-bit precision, and a band of
rows is read without decoding the whole slice when the TIFF allows it (uncompressed: memory map;
stripped or tiled: only the strips or tiles that hold the band). Every problem is a `FragmentError`
whose one-line message names the file. Every folder of a split is a fragment: one that cannot be read is an
error, never left out. Labels that look wrong against the mask (check_labels) are warnings, not errors.
"""
import logging
import os
import re
import stat
import struct
import tempfile
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr
from PIL import Image

SPLITS = ("train", "test")
SLICE_RE = re.compile(r"^(\d+)\.tiff?$")
# The largest real fragment has 141 Mpx: above PIL's decompression-bomb guard, but a genuine image.
Image.MAX_IMAGE_PIXELS = 1 << 31
LABEL_MARGIN = 16  # px: ink up to this far outside the mask is taken as drawn over the mask's edge
# What tifffile (and imagecodecs, zarr beneath it) raise on a damaged TIFF: besides its own TiffFileError, a garbled
# header or tag ends as one of Python's own errors (RuntimeError: imagecodecs' decode errors). Each becomes a
# FragmentError naming the file.
TIFF_ERRORS = (OSError, ValueError, IndexError, KeyError, TypeError, struct.error, RuntimeError, ZeroDivisionError,
               OverflowError, MemoryError, tifffile.TiffFileError)
logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # it logs what it then raises: the FragmentError says it


class FragmentError(ValueError):
    """Bad input: the message is one line and names the file."""


def list_fragments(root, split):
    """Sorted fragment ids of one split: every entry of the split folder (hidden names aside) must be a fragment
    folder with a readable surface_volume folder, else a FragmentError naming it; an error too if there are none."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FragmentError(f"{split_dir}: split folder not found")
    try:
        folders = sorted(p for p in split_dir.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise FragmentError(f"{split_dir}: unreadable folder ({err.strerror})") from None
    if not folders:
        raise FragmentError(f"{split_dir}: no fragments (no <id>/surface_volume folders)")
    for folder in folders:
        _check_folder(folder, "a fragment folder (<id>/surface_volume/00.tif ...)")
        _check_folder(folder / "surface_volume", "the fragment's folder of slices")
    return [p.name for p in folders]


def require_utf8(path, what="path"):
    """FragmentError unless `path` is valid UTF-8: the stores are HDF5 files, whose names and attributes (the source
    path) must be, so a folder name with another encoding's byte would fail there, after earlier stores were written."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise FragmentError(f"{shown}: {what} is not valid UTF-8 (a byte of another encoding in a folder name); "
                            f"rename it") from None


def _check_folder(path, what):
    """FragmentError unless `path` is a folder that can be listed (not missing, a broken link or a link loop)."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise FragmentError(f"{path}: not a folder; expected {what}")
        os.scandir(path).close()
    except OSError as err:  # missing, a broken link, a link loop (ELOOP), no permission
        raise FragmentError(f"{path}: {err.strerror.lower()}; expected {what}") from None


# PIL's errors for a bad image file: OSError (truncated, unknown format), ValueError, SyntaxError (a bad chunk or
# CRC), EOFError, struct.error on a garbled header, DecompressionBombError (above 2 x MAX_IMAGE_PIXELS)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "F")  # PIL modes of one grey channel


def read_png_binary(path):
    """A mask or label image as uint8 0/1, 1 where the shape is; the one reader of every mask and label.

    Understood: grey (nonzero is the shape); RGB whose channels are equal (grey) or of which only one varies (a
    mask drawn in one colour); with transparency (RGBA, LA, a palette with transparency): the alpha channel when
    the colour is the same everywhere (the shape saved from an image editor as the opaque part), the colour when
    alpha is, or both when they agree. Anything else (a colour picture, other modes) is a FragmentError naming the
    file: guessing would turn it silently into a wrong mask."""
    image = _open_image(path)
    try:
        if image.mode == "P":  # a palette: what the indices stand for
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        pixels = np.asarray(image)
    except IMAGE_ERRORS as err:
        raise FragmentError(f"{path}: unreadable or truncated {image_format(path)} ({_one_line(err)})") from None
    if image.mode in GREY_MODES:
        return (pixels != 0).astype(np.uint8)
    if image.mode not in ("RGB", "RGBA", "LA"):
        raise FragmentError(f"{path}: image mode {image.mode}: expected a grey, RGB or RGBA mask")
    colour, alpha = (pixels, None) if image.mode == "RGB" else (pixels[..., :-1], pixels[..., -1])
    shape = _colour_shape(colour)
    if alpha is None or _flat(alpha):
        if shape is None:
            raise FragmentError(f"{path}: a colour image (its channels differ and more than one varies): "
                                f"expected a grey mask, or one drawn in one colour channel")
        return shape
    opaque = (alpha != 0).astype(np.uint8)
    if _flat(colour) or (shape is not None and np.array_equal(shape, opaque)):
        return opaque
    raise FragmentError(f"{path}: both its colour and its transparency vary and disagree: cannot tell which "
                        f"is the mask; save it as a grey image")


def _colour_shape(colour):
    """(H, W) 0/1 from colour channels (H, W, C): any of them when they are equal (grey), the only varying one
    when the others are flat (a mask drawn in one channel); None when more than one varies differently."""
    if all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
        return (colour[..., 0] != 0).astype(np.uint8)
    varying = [c for c in range(colour.shape[-1]) if not _flat(colour[..., c])]
    if len(varying) == 1:
        return (colour[..., varying[0]] != 0).astype(np.uint8)
    return None


def _flat(array):
    return array.size == 0 or array.min() == array.max()


def _one_line(err):
    return " ".join(str(err).split()) or type(err).__name__


def image_format(path):
    """"PNG", "JPEG", "TIFF" from a file's name ("image" for other names): what its error messages call it."""
    return LAYER_FORMATS.get(Path(path).suffix[1:].lower(), "image")


def png_shape(path):
    """(height, width) of an image from its header alone."""
    image = _open_image(path)
    return image.height, image.width


def _verify_png(path):
    try:
        _open_image(path).verify()
    except IMAGE_ERRORS as err:  # PIL reports bad chunks and CRCs as SyntaxError
        raise FragmentError(f"{path}: unreadable or truncated {image_format(path)} ({_one_line(err)})") from None


def _open_image(path):
    """PIL's lazily opened image (the header read); FragmentError naming the file and its format when it is not
    there or not an image PIL reads."""
    if not Path(path).is_file():
        raise FragmentError(f"{path}: file not found")
    try:
        return Image.open(path)
    except IMAGE_ERRORS as err:
        raise FragmentError(f"{path}: unreadable {image_format(path)} ({_one_line(err)})") from None


class Fragment:
    """One fragment folder, opened lazily: construction lists the slices and reads their headers."""

    layout = "kaggle"

    def __init__(self, path, split=None):
        self.path = Path(path)
        self.fragment_id = self.path.name
        require_utf8(self.path.absolute(), "the fragment's path")
        self.split = split or self.path.parent.name
        volume_dir = self.path / "surface_volume"
        if not volume_dir.is_dir():
            raise FragmentError(f"{volume_dir}: surface_volume folder not found")
        self.slice_paths = _numbered_slices(volume_dir)
        self._raw_offsets = {}  # z -> byte offset of an uncompressed, contiguous slice's pixels (None: decode)
        self.shape, self.dtype = self._header(0)

    @classmethod
    def open(cls, root, split, fragment_id):
        return cls(Path(root) / split / fragment_id, split)

    @property
    def num_slices(self):
        return len(self.slice_paths)

    @property
    def mask_path(self):
        return self.path / "mask.png"

    @property
    def labels_path(self):
        return self.path / "inklabels.png"

    @property
    def has_labels(self):
        return self.labels_path.is_file()

    def read_rows(self, z, rows):
        """The rows `rows` (sorted row numbers) of slice `z` as (len(rows), W), each row read on its own."""
        return np.concatenate([self.read_band(z, y, y + 1) for y in rows])

    def read_band(self, z, y0, y1, out=None):
        """Rows [y0, y1) of slice `z` as native uint16 (into `out` when given), decoding only what holds them.

        An uncompressed, contiguous slice (the Kaggle files) is read with one positioned read straight into
        the result; other layouts go through tifffile + zarr, which decode only the strips or tiles needed.
        """
        path = self.slice_paths[z]
        native = self.dtype.newbyteorder("=")
        if out is not None and out.dtype != native:  # e.g. 8-bit slices into a uint16 band
            out[...] = self.read_band(z, y0, y1)
            return out
        try:
            if out is None:  # in the try: a damaged header may claim more pixels than memory holds
                out = np.empty((y1 - y0, self.shape[1]), native)
            if z not in self._raw_offsets:
                self._header(z)
            offset = self._raw_offsets[z]
            if offset is None:
                with tifffile.imread(path, aszarr=True) as store:
                    out[...] = zarr.open(store, mode="r")[y0:y1]
                return out
            row_bytes = self.shape[1] * self.dtype.itemsize
            with open(path, "rb", buffering=0) as file:
                got = os.preadv(file.fileno(), [memoryview(out).cast("B")], offset + y0 * row_bytes)
            if got != out.nbytes:
                raise OSError(f"read {got} of {out.nbytes} bytes at rows {y0}:{y1}")
        except TIFF_ERRORS as err:
            raise FragmentError(f"{path}: unreadable or truncated TIFF ({_one_line(err)})") from None
        if not self.dtype.isnative:  # the bytes are in the file's order: swap them in place
            out.view(self.dtype).byteswap(inplace=True)
        return out

    def read_layers(self, layers, y0, y1, out=None):
        """Rows [y0, y1) of the source `layers` as (len(layers), y1 - y0, W) (into `out` when given), a layer at a
        time (a zarr segment reads them together)."""
        if out is None:
            out = np.empty((len(layers), y1 - y0, self.shape[1]), self.dtype.newbyteorder("="))
        for i, z in enumerate(layers):
            self.read_band(z, y0, y1, out=out[i])
        return out

    @property
    def layers_location(self):
        """Where the layers are, for messages."""
        return self.slice_paths[0].parent

    def _header(self, z):
        """(shape, dtype) of slice `z` from its header; remembers where its raw pixels start, if they can be read raw."""
        shape, dtype, self._raw_offsets[z] = _slice_header(self.slice_paths[z])
        return shape, dtype

    def read_mask(self):
        return read_png_binary(self.mask_path)

    def read_labels(self):
        return read_png_binary(self.labels_path)

    def source_files(self):
        """Every file this fragment's store is made of (slices, mask, labels when present); the infrared photo is
        not one: nothing reads it."""
        extras = [p for p in (self.mask_path, self.labels_path) if p.is_file()]
        return list(self.slice_paths) + extras

    def validate(self, need_labels=None):
        """Check the fragment fully against its headers; raise FragmentError on the first problem.

        Reads every slice header and the mask; slice pixel data are checked for truncation by
        comparing the byte ranges the header promises with the file size (cheap for 18 GB volumes), and the
        labels PNG by PIL's verify (every chunk present, CRCs right).
        """
        for z, path in enumerate(self.slice_paths):
            shape, dtype = self._header(z)
            if shape != self.shape:
                raise FragmentError(f"{path}: slice shape {shape} differs from {self.slice_paths[0].name} {self.shape}")
            if dtype != self.dtype:
                raise FragmentError(f"{path}: slice dtype {dtype} differs from {self.slice_paths[0].name} {self.dtype}")
        if self.dtype.kind != "u" or self.dtype.itemsize > 2:
            raise FragmentError(f"{self.slice_paths[0]}: slices must be 8- or 16-bit unsigned integers, got {self.dtype}")
        if need_labels is None:
            need_labels = self.split == "train"
        pngs = [self.mask_path] + ([self.labels_path] if need_labels else [])
        for path in pngs:
            shape = png_shape(path)
            if shape != self.shape:
                raise FragmentError(f"{path}: shape {shape} differs from the slices {self.shape}")
        if not self.read_mask().any():
            raise FragmentError(f"{self.mask_path}: mask is empty (no papyrus pixels)")
        for path in pngs[1:]:  # complete and intact to the last chunk (CRCs), without decoding the pixels again
            _verify_png(path)
        return self


def check_labels(fragment, strict=False):
    """(fraction of the mask that is ink, one-line warnings) of a fragment's labels against its mask; the warnings:
    no ink inside the mask, or ink more than LABEL_MARGIN px outside it (labels and mask of different fragments,
    or shifted). (None, []) without labels. With `strict` the first warning is a FragmentError."""
    if not fragment.has_labels:
        return None, []
    labels, mask = fragment.read_labels(), fragment.read_mask()
    ink_in_mask = float(labels[mask > 0].mean())
    warnings = []
    if ink_in_mask == 0:
        warnings.append(f"{fragment.labels_path}: no ink inside the mask {fragment.mask_path.name}")
    side = 2 * LABEL_MARGIN + 1
    near_mask = cv2.dilate(mask, np.ones((side, side), np.uint8))
    outside = np.count_nonzero(labels > near_mask)
    if outside:
        warnings.append(f"{fragment.labels_path}: {outside} ink pixels ({outside / np.count_nonzero(labels):.1%} of "
                        f"the ink) lie more than {LABEL_MARGIN} px outside the mask {fragment.mask_path.name}")
    if warnings and strict:
        raise FragmentError(f"{warnings[0]} (--strict)")
    return ink_in_mask, warnings


def open_split(root, split, ids=None):
    """Open and validate the fragments of one split (all of them, or those in `ids` that exist here)."""
    available = list_fragments(root, split)
    chosen = available if ids is None else [i for i in available if i in ids]
    return [Fragment.open(root, split, i).validate() for i in chosen]


def present_splits(root):
    """The Kaggle splits (train, test) that `root` has folders for; a FragmentError when it has neither."""
    splits = [s for s in SPLITS if (Path(root) / s).is_dir()]
    if not splits:
        raise FragmentError(f"{root}: no train/ or test/ folder: not a dataset root in the Kaggle layout")
    return splits


def open_fragments(root, layout, ids=None, train_ids=None, test_ids=None):
    """(fragments, a line saying how many each split holds): every fragment of `root` (of every split present in
    the Kaggle layout; segments in the roles open_segments gives them), or only those in `ids`, opened and
    validated before anything is written."""
    if layout == "kaggle":
        splits = present_splits(root)
        counts = {split: len(list_fragments(root, split)) for split in splits}
        fragments = [f for split in splits for f in open_split(root, split, ids)]
        kind, among = "fragment", ""
    else:
        segments = open_segments(root, train_ids, test_ids)
        counts = {split: sum(s.split == split for s in segments) for split in SPLITS}
        fragments = [s for s in segments if ids is None or s.fragment_id in ids]
        kind, among = "segment", " among those selected"
    missing = set(ids or ()) - {f.fragment_id for f in fragments}
    if missing:
        raise FragmentError(f"{root}: no {kind} named {', '.join(sorted(missing))}{among}")
    found = " and ".join(f"{count} {split}" for split, count in counts.items())
    return fragments, f"{root}: {found} {kind}s; preparing {len(fragments)}"


def _numbered_slices(volume_dir):
    numbered = {}
    for p in volume_dir.iterdir():
        match = SLICE_RE.match(p.name)
        if match:
            numbered[int(match.group(1))] = p
    if not numbered:
        raise FragmentError(f"{volume_dir}: no slices (expected 00.tif, 01.tif, ...)")
    expected = list(range(len(numbered)))
    if sorted(numbered) != expected:
        missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
        raise FragmentError(f"{volume_dir}: slice numbers are not contiguous from 00 (missing {missing[:5]})")
    return [numbered[z] for z in expected]


def _slice_header(path):
    """(shape, dtype, raw_offset) from a TIFF header, checking that the pixel data the header promises is in the
    file. raw_offset is where the pixels start when they are stored uncompressed and contiguous, else None."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(int(n) for n in page.shape), np.dtype(page.dtype).newbyteorder(tif.byteorder)
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
            uncompressed = page.compression == 1
            stored = sum(page.databytecounts)
            raw_offset = page.dataoffsets[0] if page.is_contiguous and uncompressed else None
    except TIFF_ERRORS as err:
        raise FragmentError(f"{path}: unreadable TIFF ({_one_line(err)})") from None
    if len(shape) != 2 or 0 in shape:
        raise FragmentError(f"{path}: expected a single-channel 2-D slice, got shape {shape}")
    if end > os.path.getsize(path):
        raise FragmentError(f"{path}: truncated TIFF (pixel data ends at byte {end}, file has {os.path.getsize(path)})")
    if uncompressed and stored < shape[0] * shape[1] * dtype.itemsize:
        raise FragmentError(f"{path}: truncated or damaged TIFF (its header says {shape[0]} x {shape[1]} pixels, "
                            f"its uncompressed pixel data holds {stored} bytes)")
    return shape, dtype, raw_offset


# ------------------------------------------------------------------------------------------- scroll segments

LAYOUTS = ("kaggle", "segments")
LAYER_RE = re.compile(r"^(\d+)\.(tiff?|jpe?g|png)$", re.IGNORECASE)
LAYER_FORMATS = {"tif": "TIFF", "tiff": "TIFF", "jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
IMAGE_DTYPES = {"L": np.dtype(np.uint8), "I;16": np.dtype(np.uint16), "I;16L": np.dtype(np.uint16),
                "I;16B": np.dtype(np.uint16), "I": np.dtype(np.uint16)}  # PIL modes of greyscale PNG / JPEG layers


def detect_layout(root):
    """"kaggle" when ROOT has a train/ or test/ folder, "segments" when it has <id>/layers/ folders."""
    root = Path(root)
    if not root.is_dir():
        raise FragmentError(f"{root}: dataset root not found")
    if any((root / split).is_dir() for split in SPLITS):
        return "kaggle"
    if any((p / "layers").is_dir() for p in root.iterdir()):
        return "segments"
    raise FragmentError(f"{root}: neither the Kaggle layout (train/, test/) nor the segment layout (<id>/layers/)")


def list_segments(root):
    """Sorted ids of the segment folders (<id>/layers/) of a root; a folder with <id>_mask.png but no layers/ is
    an error, not a silent skip."""
    root = Path(root)
    ids = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "layers").is_dir():
            ids.append(folder.name)
        elif (folder / f"{folder.name}_mask.png").is_file():
            raise FragmentError(f"{folder / 'layers'}: layers folder not found")
    if not ids:
        raise FragmentError(f"{root}: no segments (no <id>/layers folders)")
    return ids


def layer_format(path):
    """"TIFF", "JPEG" or "PNG" from a layer's file name."""
    return LAYER_FORMATS[Path(path).suffix[1:].lower()]


class Segment(Fragment):
    """One scroll segment folder, opened lazily like a Fragment (same reading and validation methods).

    `split` is the role prepare.py gives it: "train" (needs ink labels) or "test"; default: train when it has
    <id>_inklabels.png. Layers are uint16 or 8-bit TIFF (read by bands, as Kaggle slices are), 8-bit JPEG, or 8- or
    16-bit PNG. JPEG and PNG have no random access to rows: such a layer is decoded whole on its first band read
    and kept as an uncompressed file in a temporary folder (removed with the object), from which its bands are
    read, so each layer is decoded once and memory holds one decoded layer at most.
    """

    layout = "segments"

    def __init__(self, path, split=None):
        self.path = Path(path)
        self.fragment_id = self.path.name
        require_utf8(self.path.absolute(), "the segment's path")
        layers_dir = self.path / "layers"
        if not layers_dir.is_dir():
            raise FragmentError(f"{layers_dir}: layers folder not found")
        self.slice_paths = _numbered_layers(layers_dir)
        self.format = layer_format(self.slice_paths[0])
        self._raw_offsets = {}
        self._decoded = None  # TemporaryDirectory holding decoded JPEG / PNG layers as <z>.raw
        self.shape, self.dtype = self._header(0)
        self.split = split or ("train" if self.has_labels else "test")

    @property
    def mask_path(self):
        return self.path / f"{self.fragment_id}_mask.png"

    @property
    def labels_path(self):
        return self.path / f"{self.fragment_id}_inklabels.png"

    def _header(self, z):
        """(shape, dtype) of layer `z` from its header; every layer must have the first one's format."""
        path = self.slice_paths[z]
        if layer_format(path) != self.format:
            raise FragmentError(f"{path}: {layer_format(path)} layer among {self.format} layers "
                                f"({self.slice_paths[0].name}): mixed layer formats")
        if self.format == "TIFF":
            return super()._header(z)
        image = _open_image(path)  # PIL opens JPEG too; only the header is read
        if image.mode not in IMAGE_DTYPES:
            raise FragmentError(f"{path}: expected a single-channel 8- or 16-bit greyscale layer, "
                                f"got mode {image.mode}")
        self._raw_offsets[z] = None
        return (image.height, image.width), IMAGE_DTYPES[image.mode]

    def decode_layer(self, z):
        """Layer `z` decoded whole, in its own dtype (for JPEG / PNG layers). PIL, not OpenCV: OpenCV returns a
        truncated JPEG padded with grey, PIL refuses it."""
        path = self.slice_paths[z]
        try:
            pixels = np.asarray(_open_image(path))
        except IMAGE_ERRORS as err:
            raise FragmentError(f"{path}: unreadable or truncated {self.format} layer ({_one_line(err)})") from None
        if pixels.shape != self.shape:
            raise FragmentError(f"{path}: layer shape {pixels.shape} differs from "
                                f"{self.slice_paths[0].name} {self.shape}")
        return pixels.astype(self.dtype, copy=False)

    def read_rows(self, z, rows):
        if self.format == "TIFF":
            return super().read_rows(z, rows)
        return self.decode_layer(z)[rows]

    def read_band(self, z, y0, y1, out=None):
        if self.format == "TIFF":
            return super().read_band(z, y0, y1, out)
        raw = self._decoded_path(z)
        width, itemsize = self.shape[1], self.dtype.itemsize
        band = np.fromfile(raw, self.dtype, count=(y1 - y0) * width, offset=y0 * width * itemsize)
        band = band.reshape(y1 - y0, width)
        if out is None:
            return band
        out[...] = band
        return out

    def _decoded_path(self, z):
        if self._decoded is None:
            self._decoded = tempfile.TemporaryDirectory(prefix=f"inkseg-{self.fragment_id}-")
        raw = Path(self._decoded.name) / f"{z}.raw"
        if not raw.is_file():
            tmp = raw.with_suffix(".tmp")
            self.decode_layer(z).tofile(tmp)
            os.replace(tmp, raw)
        return raw


def open_segments(root, train_ids=None, test_ids=None):
    """Open and validate the segments of a root as (train, test) lists. With neither list given: labelled segments
    are train, unlabelled ones test; with either given, only the listed segments, in the role listed."""
    available = list_segments(root)
    if train_ids is None and test_ids is None:
        segments = [Segment(Path(root) / i) for i in available]
    else:
        train_ids, test_ids = list(train_ids or []), list(test_ids or [])
        both = sorted(set(train_ids) & set(test_ids))
        if both:
            raise FragmentError(f"{root}: segment {', '.join(both)} listed both as train and as test")
        missing = sorted(set(train_ids + test_ids) - set(available))
        if missing:
            raise FragmentError(f"{Path(root) / missing[0]}: no such segment (no layers folder)")
        segments = [Segment(Path(root) / i, "train" if i in train_ids else "test")
                    for i in available if i in train_ids + test_ids]
    return [s.validate() for s in segments]


def _numbered_layers(layers_dir):
    """Layer files 0..N-1 (any number of digits, one file per number); a gap is an error naming the missing file."""
    numbered = {}
    for p in sorted(layers_dir.iterdir()):
        match = LAYER_RE.match(p.name)
        if match:
            z = int(match.group(1))
            if z in numbered:
                raise FragmentError(f"{p}: a second file for layer {z} (beside {numbered[z].name})")
            numbered[z] = p
    if not numbered:
        raise FragmentError(f"{layers_dir}: no layers (expected 00.tif, 01.tif, ... or .jpg / .png)")
    for z in range(max(numbered) + 1):
        if z not in numbered:
            first = numbered[min(numbered)]
            digits = len(LAYER_RE.match(first.name).group(1))
            raise FragmentError(f"{layers_dir / f'{z:0{digits}d}{first.suffix}'}: layer missing "
                                f"(layers must run from 0 to {max(numbered)} without gaps)")
    return [numbered[z] for z in range(len(numbered))]


def main(argv=None):
    """`python -m lib.fragments ROOT`: validate every fragment of a dataset root and print one line each."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Validate a dataset root in the Kaggle or the segment layout.")
    parser.add_argument("root")
    parser.add_argument("--strict", action="store_true", help="labels that look wrong against the mask are errors")
    args = parser.parse_args(argv)
    try:
        if detect_layout(args.root) == "segments":  # labelled segments as train, the others as test
            for segment in open_segments(args.root):
                h, w = segment.shape
                ink = f", ink {segment.read_labels().mean():.1%} of pixels" if segment.has_labels else ""
                print(f"{segment.fragment_id} ({segment.split}): {segment.num_slices} {segment.format} layers of "
                      f"{h} x {w} {segment.dtype}{ink}: ok")
            return
        for split in present_splits(args.root):  # as prepare.py: a root with train/ alone is fine
            fragments = open_split(args.root, split)
            print(f"{split}: {len(fragments)} fragments", flush=True)
            for fragment in fragments:
                h, w = fragment.shape
                ink_in_mask, warnings = check_labels(fragment, args.strict)
                for warning in warnings:
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
                ink = "" if ink_in_mask is None else f", ink {ink_in_mask:.1%} of the mask"
                status = "ok" if not warnings else "labels doubtful"
                print(f"{split}/{fragment.fragment_id}: {fragment.num_slices} slices of {h} x {w} {fragment.dtype}{ink}: "
                      f"{status}",
                      flush=True)
    except FragmentError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
