"""A scroll segment served as a zarr volume, local or over HTTP(S), read like a Fragment by prepare.py.

    SOURCE                          a zarr array (Z, H, W) uint8 / uint16, or an OME-Zarr group (its multiscales'
                                    first dataset: the full resolution), e.g. .../20230827161847.zarr or
                                    https://host/segments/20230827161847.zarr
    beside it, <id>_mask.png        (or .tif / .tiff / .zarr) papyrus mask, nonzero = papyrus; <id> is SOURCE's name
                                    without .zarr
    beside it, <id>_inklabels.png   (or .tif / .tiff / .zarr) ink labels, for train segments

zarr opens local paths and http(s):// URLs itself (remote ones through fsspec, whose HTTP file system runs on
aiohttp); nothing here lists a folder, so a plain static HTTP server will do. A band of rows is one zarr read of
the kept layers' span: zarr fetches and decodes the chunks it touches concurrently, and a chunk spanning all layers
is fetched once a band, not once a layer; the read goes on to the end of the chunk row the band ends in, and the
next band starts from the rows kept, so a chunk is fetched once, not once for each band it straddles. Every problem
is a FragmentError whose one line names the source.
"""
import io
import os

import fsspec
import numpy as np
import tifffile
import zarr
from PIL import Image
from zarr.core.buffer.cpu import NDBuffer

from lib.fragments import Fragment, FragmentError

MAP_SUFFIXES = (".png", ".tif", ".tiff", ".zarr")
SOURCE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
FETCHES = 4  # chunks a read fetches and decodes at a time (zarr's async.concurrency; its default, 10, ran slower:
# each chunk's bytes pass through Python on zarr's one event loop thread; bench/README.md, "## scale")


def is_zarr_source(text):
    """True when `text` names a zarr source (its name ends in .zarr), local or remote."""
    return str(text).rstrip("/").endswith(".zarr")


class Location(str):
    """A local path or URL, with the `.name` that messages print (pathlib would fold the // of a URL)."""

    @property
    def name(self):
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self):
        head, _, _ = self.rstrip("/").rpartition("/")
        return Location(head or ("/" if self.startswith("/") else "."))

    def child(self, name):
        return Location(f"{self.rstrip('/')}/{name}")

    def resolve(self):
        """A URL as it is; a local path made absolute (what a store records as its source)."""
        return self if "://" in self else Location(os.path.abspath(self))


def _exists(location):
    """True when a file (or, for a .zarr, its folder's metadata) is at `location`, local or remote."""
    try:
        if location.endswith(".zarr"):
            return any(_exists(location.child(n)) for n in ("zarr.json", ".zarray"))
        fs, path = fsspec.core.url_to_fs(location)
        return fs.isfile(path)
    except (OSError, ValueError):
        return False


def open_volume(source):
    """The full-resolution (Z, H, W) zarr array of a source: the array itself, or an OME-Zarr group's first level."""
    try:
        node = zarr.open(source, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:  # zarr raises FileNotFoundError when nothing is there
        raise FragmentError(f"{source}: no zarr array or group here ({type(err).__name__}: {err})") from None
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise FragmentError(f"{source}: a zarr group without OME-Zarr multiscales metadata; give the (Z, H, W) "
                                f"array itself")
        level = multiscales[0]["datasets"][0]["path"]
        try:
            node = node[level]
        except KeyError:
            raise FragmentError(f"{source}: OME-Zarr full-resolution level {level!r} missing") from None
        if not isinstance(node, zarr.Array):
            raise FragmentError(f"{source}/{level}: the full-resolution level is not an array")
        source = Location(source).child(level)
    if node.ndim != 3:
        raise FragmentError(f"{source}: expected a (Z, H, W) volume, got shape {node.shape}")
    if node.dtype not in SOURCE_DTYPES:
        raise FragmentError(f"{source}: layers must be uint8 or uint16, got {node.dtype}")
    return node


def read_map(location):
    """A mask or labels map (PNG, TIFF or a 2-D zarr array, local or remote) as uint8 0/1, nonzero meaning 1."""
    try:
        if location.endswith(".zarr"):
            pixels = zarr.open_array(location, mode="r")[...]
        else:
            with fsspec.open(location, "rb") as f:
                data = f.read()
            pixels = tifffile.imread(io.BytesIO(data)) if location.endswith((".tif", ".tiff")) else \
                np.asarray(Image.open(io.BytesIO(data)))
    except (OSError, ValueError, KeyError, RuntimeError, tifffile.TiffFileError) as err:
        raise FragmentError(f"{location}: unreadable map ({type(err).__name__}: {err})") from None
    if pixels.ndim == 3:  # a colour image: its first channel, as for PNG masks
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise FragmentError(f"{location}: expected a 2-D map, got shape {pixels.shape}")
    return (pixels != 0).astype(np.uint8)


class ZarrSegment(Fragment):
    """One segment whose layers are a zarr volume (module docstring); the reading and validation interface of
    Fragment, so write_store and lib/depth.py take it as they take a folder of layers."""

    layout = "segments"  # a scroll segment: submit.py writes probability maps for it, no Kaggle CSV

    def __init__(self, source, split=None):
        self.url = Location(str(source).rstrip("/"))
        self.path = self.url
        self.fragment_id = self.url.name[: -len(".zarr")]
        self.volume = open_volume(self.url)
        self.shape, self.dtype = tuple(self.volume.shape[1:]), np.dtype(self.volume.dtype)
        self._profile_rows = None  # (rows, (Z, len(rows), W) array): read_rows' cache
        self._tail = None  # (z0, z1, y0, rows): the rows from y0 that the last read_layers read past its end
        self._maps = {kind: self._beside(kind, required=kind == "mask") for kind in ("mask", "inklabels")}
        self.split = split or ("train" if self.has_labels else "test")

    def _beside(self, kind, required):
        candidates = [self.url.parent.child(f"{self.fragment_id}_{kind}{suffix}") for suffix in MAP_SUFFIXES]
        found = next((c for c in candidates if _exists(c)), None)
        if found is None and required:
            raise FragmentError(f"{candidates[0]}: {kind} not found (nor as {', '.join(MAP_SUFFIXES[1:])}) "
                                f"beside the segment")
        return found or candidates[0]

    @property
    def num_slices(self):
        return self.volume.shape[0]

    @property
    def mask_path(self):
        return self._maps["mask"]

    @property
    def labels_path(self):
        return self._maps["inklabels"]

    @property
    def has_labels(self):
        return _exists(self.labels_path)

    @property
    def layers_location(self):
        return self.url

    def source_files(self):
        """The volume's metadata documents and the maps: what store.fingerprint stamps (size and mtime, or a remote
        server's size and ETag / Last-Modified). Chunks rewritten under unchanged metadata go unnoticed."""
        volume = Location(self.url if self.volume.path == "" else self.url.child(self.volume.path))
        meta = [volume.child(name) for name in ("zarr.json", ".zarray", ".zattrs") if _exists(volume.child(name))]
        return meta + [p for p in (self.mask_path, self.labels_path) if _exists(p)]

    def read_mask(self):
        return read_map(self.mask_path)

    def read_labels(self):
        return read_map(self.labels_path)

    def read_layers(self, layers, y0, y1, out=None):
        """Rows [y0, y1) of the source `layers` as (len(layers), y1 - y0, W), from their span of layers: decoded
        straight into `out` when the layers run up or down without gaps (the usual windows, reversed or not)."""
        z0, z1 = min(layers), max(layers) + 1
        if out is None:
            out = np.empty((len(layers), y1 - y0, self.shape[1]), self.dtype)
        step = 1 if list(layers) == list(range(z0, z1)) else -1 if list(layers) == list(range(z1 - 1, z0 - 1, -1)) \
            else 0
        if step:
            self._read_span(z0, z1, y0, y1, out[::step])
        else:
            span = np.empty((z1 - z0, y1 - y0, self.shape[1]), self.dtype)
            self._read_span(z0, z1, y0, y1, span)
            out[...] = span[[z - z0 for z in layers]]
        return out

    def _read_span(self, z0, z1, y0, y1, out):
        """Rows [y0, y1) of layers z0..z1 - 1 into `out`. zarr fetches and decodes every chunk a read touches, so
        the chunk row that y1 cuts is read whole, into a buffer of its own, and the rows of it past y1 are kept: the
        next call, which usually starts at y1 (bands in order), takes them from there. So each chunk is fetched
        once however the bands fall across the source's chunk rows; memory: one chunk row of the span."""
        if self._tail is not None and self._tail[:3] == (z0, z1, y0):
            rows = self._tail[3]
            kept = min(y1 - y0, rows.shape[1])
            out[:, :kept] = rows[:, :kept]
            self._tail = (z0, z1, y0 + kept, rows[:, kept:]) if kept < rows.shape[1] else None
            y0, out = y0 + kept, out[:, kept:]
        chunk_rows = self.volume.chunks[1]
        cut = max(y0, y1 // chunk_rows * chunk_rows)  # where the chunk row holding y1 starts (y1 itself: none)
        if cut > y0:
            self._select(z0, z1, y0, cut, out[:, : cut - y0])
        if cut < y1:
            end = min(self.shape[0], (cut // chunk_rows + 1) * chunk_rows)
            last = self._select(z0, z1, cut, end, np.empty((z1 - z0, end - cut, self.shape[1]), self.dtype))
            out[:, cut - y0:] = last[:, : y1 - cut]
            self._tail = (z0, z1, y1, last[:, y1 - cut:]) if end > y1 else None

    def _select(self, z0, z1, y0, y1, out):
        try:
            with zarr.config.set({"async.concurrency": FETCHES}):
                self.volume.get_basic_selection((slice(z0, z1), slice(y0, y1)), out=NDBuffer.from_numpy_array(out))
        except (OSError, ValueError, RuntimeError) as err:
            raise FragmentError(f"{self.url}: unreadable rows {y0}:{y1} ({type(err).__name__}: {err})") from None
        return out

    def read_band(self, z, y0, y1, out=None):
        return self.read_layers([z], y0, y1, None if out is None else out[None])[0]

    def read_rows(self, z, rows):
        """Rows `rows` of layer `z`. lib/depth.py asks every layer for the same sample of rows: all layers' rows are
        read at the first call (one read per row, not one per row and layer) and kept for the next."""
        key = tuple(int(r) for r in rows)
        if self._profile_rows is None or self._profile_rows[0] != key:
            try:
                with zarr.config.set({"async.concurrency": FETCHES}):
                    block = self.volume.get_orthogonal_selection((slice(None), list(key), slice(None)))
            except (OSError, ValueError, RuntimeError) as err:
                raise FragmentError(f"{self.url}: unreadable rows ({type(err).__name__}: {err})") from None
            self._profile_rows = (key, block)
        return self._profile_rows[1][z]

    def validate(self, need_labels=None):
        """Maps present with the volume's shape, a mask with papyrus; labels for a train segment."""
        need_labels = self.split == "train" if need_labels is None else need_labels
        if need_labels and not self.has_labels:
            raise FragmentError(f"{self.labels_path}: ink labels not found (a train segment needs them)")
        maps = [(self.mask_path, self.read_mask())] + ([(self.labels_path, self.read_labels())] if need_labels else [])
        for location, pixels in maps:
            if pixels.shape != self.shape:
                raise FragmentError(f"{location}: shape {pixels.shape} differs from the volume's {self.shape} "
                                    f"({self.url})")
        if not maps[0][1].any():
            raise FragmentError(f"{self.mask_path}: mask is empty (no papyrus pixels)")
        return self


def open_zarr_segments(sources, train_ids=None, test_ids=None):
    """Open and validate zarr segments (a list of sources) in their roles: as open_segments gives them."""
    segments = [ZarrSegment(source) for source in sources]
    if train_ids is not None or test_ids is not None:
        train_ids, test_ids = list(train_ids or []), list(test_ids or [])
        missing = sorted(set(train_ids + test_ids) - {s.fragment_id for s in segments})
        if missing:
            raise FragmentError(f"{', '.join(sources)}: no zarr segment named {missing[0]}")
        segments = [ZarrSegment(s.url, "train" if s.fragment_id in train_ids else "test")
                    for s in segments if s.fragment_id in train_ids + test_ids]
    return [s.validate() for s in segments]
