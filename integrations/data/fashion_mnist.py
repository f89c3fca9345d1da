"""Fashion-MNIST read from its four IDX files, never downloaded.

Fashion-MNIST (Zalando Research, MIT licence) is 70,000 grey 28 x 28 photographs of products in
10 classes, with an official split of 60,000 training and 10,000 test images. It ships as four
IDX files, gzipped or not, which this module looks for in:

- a directory the caller names, or its torchvision layout ``<dir>/FashionMNIST/raw``;
- otherwise Debian's location, ``/usr/share/datasets/fashion-mnist``
  (``apt-get install dataset-fashion-mnist`` on Debian and Ubuntu).

The IDX format (LeCun's MNIST page): a 4-byte magic number, two zero bytes then a type byte
(0x08: unsigned bytes) and the number of dimensions; then each dimension as a big-endian 32-bit
count; then the data, row-major. Every header field and the data length are checked, and every
error names the file, what was expected and how to install the data.

Example (on generated files; `write_idx` is the writer the tests use):
    >>> import numpy as np, tempfile
    >>> from smooth_infonce.integrations.data.fashion_mnist import read_idx, write_idx
    >>> folder = tempfile.mkdtemp()
    >>> write_idx(f"{folder}/x.gz", np.arange(12, dtype=np.uint8).reshape(3, 2, 2))
    >>> read_idx(f"{folder}/x.gz").shape
    (3, 2, 2)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from smooth_infonce.integrations.recipes import CropSpec, ViewSpec

from .digits import ImageList

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_SPEC = "fashion-mnist"  # --data fashion-mnist[:DIR]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train", 60_000), "test": ("t10k", 10_000)}  # file prefix, official count
IMAGE_SIDE = 28
# Pixel statistics of the 60,000 training images (values / 255), for the normalisation of the views.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
INSTALL_HINT = ("Install the data with `apt-get install dataset-fashion-mnist` (Debian and Ubuntu: "
                f"{DEBIAN_DIR}), or put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the dataset's repository "
                "(github.com/zalandoresearch/fashion-mnist, data/fashion) in a directory and name it "
                "(--data fashion-mnist:DIR). Nothing is downloaded.")

# IDX type byte -> numpy dtype (big-endian where it matters)
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


class FashionMNISTError(ValueError):
    """A Fashion-MNIST file that is missing or not what it should be (the message says which)."""


class FashionMNISTNotFound(FashionMNISTError, FileNotFoundError):
    """A Fashion-MNIST file that is in none of the places looked in."""


def _fail(path: Union[str, Path], problem: str) -> FashionMNISTError:
    return FashionMNISTError(f"{path}: {problem}. {INSTALL_HINT}")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise _fail(path, f"a gzip file that does not decompress ({err}); it is probably truncated") from None


def read_idx(path: Union[str, Path], expected_shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    """The array stored in one IDX file (gzipped or not), in native byte order.

    ``expected_shape``: check the header's dimensions against these (the error names both).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise _fail(path, f"{len(data)} bytes, shorter than the 4-byte IDX magic number")
    zero, dtype_code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code not in IDX_TYPES or ndim == 0:
        raise _fail(path, f"magic number 0x{data[:4].hex()} is not IDX's (expected 0x0000 then a type byte in "
                          f"{{{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}}} and the number of dimensions, "
                          "e.g. 0x00000803 for images, 0x00000801 for labels)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _fail(path, f"truncated header: {ndim} dimensions need {header} bytes, the file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise _fail(path, f"dimensions {shape}, expected {tuple(expected_shape)}")
    dtype = IDX_TYPES[dtype_code]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header
    if body != expected_bytes:
        what = "truncated" if body < expected_bytes else "longer than its header says"
        raise _fail(path, f"{what}: dimensions {shape} of {dtype.name} need {expected_bytes} data bytes, the "
                          f"file has {body}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: Union[str, Path], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in .gz)."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("=").str: code for code, dtype in IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"array dtype {array.dtype} has no IDX type (IDX holds {sorted(codes)})")
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + array.astype(IDX_TYPES[code]).tobytes())
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


def candidate_dirs(directory: Optional[Union[str, Path]] = None) -> Tuple[Path, ...]:
    """Where the files are looked for: ``directory`` and its torchvision layout, or Debian's."""
    if directory is None:
        return (DEBIAN_DIR,)
    directory = Path(directory).expanduser()
    return (directory, directory / "FashionMNIST" / "raw")


def find_file(name: str, directory: Optional[Union[str, Path]] = None) -> Path:
    """The path of the IDX file ``name`` (e.g. ``train-images-idx3-ubyte``), plain or ``.gz``."""
    looked = []
    for folder in candidate_dirs(directory):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
            looked.append(str(candidate))
    raise FashionMNISTNotFound(f"Fashion-MNIST file {name}(.gz) not found; looked for {', '.join(looked)}. "
                               f"{INSTALL_HINT}")


def load_fashion_mnist(split: str, directory: Optional[Union[str, Path]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the official ``split`` ("train": 60,000, "test": 10,000):
    uint8 arrays of shape (count, 28, 28) and (count,), labels in 0..9 (`CLASSES`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    prefix, count = SPLITS[split]
    images_path = find_file(f"{prefix}-images-idx3-ubyte", directory)
    labels_path = find_file(f"{prefix}-labels-idx1-ubyte", directory)
    images = read_idx(images_path, (count, IMAGE_SIDE, IMAGE_SIDE))
    labels = read_idx(labels_path, (count,))
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise _fail(images_path if images.dtype != np.uint8 else labels_path,
                    "IDX type is not 0x08 (unsigned bytes), which Fashion-MNIST's images and labels are")
    if labels.max() >= len(CLASSES):
        raise _fail(labels_path, f"label {int(labels.max())} is outside the {len(CLASSES)} classes 0..9")
    return images, labels


class _GreyToRGB:
    """Loads item ``i`` of a (count, H, W) uint8 array as an RGB PIL image (picklable, for workers)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __call__(self, index: int):
        from PIL import Image

        return Image.fromarray(self.pixels[index]).convert("RGB")


def fashion_mnist_images(split: str, directory: Optional[Union[str, Path]] = None) -> ImageList:
    """The official ``split`` as an `ImageList` of 28 px RGB PIL images, made lazily from the arrays."""
    images, labels = load_fashion_mnist(split, directory)
    return ImageList(range(len(labels)), labels.tolist(), loader=_GreyToRGB(images))


def parse_data_spec(spec: str) -> Optional[str]:
    """``"fashion-mnist"`` -> None (the default location), ``"fashion-mnist:DIR"`` -> DIR; raises
    ValueError for anything else."""
    name, _, directory = spec.partition(":")
    if name != DATA_SPEC:
        raise ValueError(f"data {spec!r} is not {DATA_SPEC}[:DIR]")
    if _ and not directory:
        raise ValueError(f"data {spec!r}: give a directory after the colon, or none ({DATA_SPEC})")
    return directory or None


def is_data_spec(spec: Optional[str]) -> bool:
    """Whether ``spec`` names Fashion-MNIST (``fashion-mnist`` or ``fashion-mnist:DIR``), not a folder."""
    return spec is not None and (spec == DATA_SPEC or spec.startswith(DATA_SPEC + ":")) and not os.path.isdir(spec)


def fashion_mnist_views(image_size: int, scale: Tuple[float, float] = (0.2, 1.0)) -> ViewSpec:
    """Views for small grey product photos: MoCo v2's crop scale, horizontal flips (a mirrored
    shirt is a shirt), brightness and contrast jitter (hue and saturation do nothing to grey
    pixels, nor does greyscale), no blur (lightly's sigma of 0.1 to 2 px erases a 28 px image)."""
    return ViewSpec(
        global_crops=CropSpec(2, image_size, scale), interpolation="bicubic", hflip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.0, 0.0), color_jitter_prob=0.8, grayscale_prob=0.0, blur_prob=0.0,
        mean=(PIXEL_MEAN,) * 3, std=(PIXEL_STD,) * 3,
    )
