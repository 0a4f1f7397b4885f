"""2-D maps: bit-packed 0/1 maps in memory (PackedMap: masks and labels), and probability maps as files: float16
HDF5 (out-of-fold maps, --save-probs), 8-bit PNG (segment predictions) and preview PNGs of maps side by side. Every
file is written under a temporary name and renamed when complete."""
from pathlib import Path

import cv2
import h5py
import numpy as np

from lib.outputs import atomic_path, write_atomically


class PackedMap:
    """A 0/1 (H, W) map held bit-packed (1 bit a pixel: 18 MB for the largest Kaggle fragment), whose windows cost
    next to nothing, where reading one from the store decodes up to four 512 x 512 chunks."""

    def __init__(self, image):
        self.shape = image.shape
        self.bits = np.packbits(np.asarray(image, np.uint8) > 0, axis=1)

    def window(self, y, x, size):
        """(size, size) uint8 of the map at (y, x) (both >= 0), 0 outside it."""
        height, width = self.shape
        out = np.zeros((size, size), np.uint8)
        y1, x1 = min(y + size, height), min(x + size, width)
        if y1 > y and x1 > x:
            bits = np.unpackbits(self.bits[y:y1, x // 8: (x1 + 7) // 8], axis=1)
            out[: y1 - y, : x1 - x] = bits[:, x % 8: x % 8 + x1 - x]
        return out

    def rows(self, y0, y1):
        """(y1 - y0, W) uint8 of the map's rows y0..y1 (inside it)."""
        return np.unpackbits(self.bits[y0:y1], axis=1, count=self.shape[1])

    def sample(self, rows, columns):
        """(len(rows), len(columns)) uint8 of the map at those row and column indices (inside it)."""
        return np.unpackbits(self.bits[rows], axis=1, count=self.shape[1])[:, columns]


def save_probability_map(path, prob, **attrs):
    """Write a probability map as float16 HDF5 (dataset "prob"), atomically: temp name, then rename."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("prob", data=prob.astype(np.float16), chunks=True, compression="gzip", compression_opts=1)
        h5.attrs.update(attrs)


def load_probability_map(path):
    """(prob float32 (H, W), attrs dict) from save_probability_map's file."""
    with h5py.File(path, "r") as h5:
        return h5["prob"][()].astype(np.float32), dict(h5.attrs)


def save_preview(path, panels):
    """A PNG of 2-D maps in 0..1 side by side (e.g. probability, binary prediction, label), 8 px apart, at most
    2048 px wide: each map is shrunk before it is made 8-bit, so a huge fragment needs no full-size copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = min(1.0, 2048 / (sum(p.shape[1] for p in panels) + 8 * (len(panels) - 1)))
    panels = [_preview_panel(p, scale) for p in panels]
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, max(1, round(8 * scale))), 128, np.uint8)
    tiles = []
    for panel in panels:
        image = np.zeros((height, panel.shape[1]), np.uint8)
        image[: panel.shape[0]] = panel
        tiles += [image, gap]
    encoded = cv2.imencode(".png", np.hstack(tiles[:-1]))[1]
    write_atomically(path, lambda file: file.write(encoded.tobytes()), "wb")  # a full disk: the old preview stays


def _preview_panel(panel, scale):
    """A map in 0..1 as uint8 0..255, shrunk by `scale` (area averaging) first when below 1."""
    if panel.dtype == np.uint8 or panel.dtype == bool:  # 0/1 masks: cheap to scale to 0/255 at full size
        panel = np.asarray(panel, np.uint8) * np.uint8(255)
        if scale < 1:
            panel = cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return panel
    if scale < 1:
        panel = cv2.resize(np.asarray(panel, np.float32), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return (np.clip(panel, 0, 1) * 255).astype(np.uint8)


def save_probability_png(path, prob):
    """A probability map as an 8-bit greyscale PNG, round(255 p) saturated to 0..255, atomically (temp, rename)."""
    with atomic_path(path, ".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.convertScaleAbs(prob, alpha=255.0)):
            raise OSError(f"{tmp}: could not write the PNG")
