"""Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or not, without torchvision.

IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the data in
C order, big-endian. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64.
"""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np
import torch

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# The four Fashion-MNIST files, by role; each may be stored gzipped (name + ".gz") or not.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"


class IDXFormatError(ValueError):
    """The bytes are not a well-formed IDX file."""


class DatasetNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are not where we looked; the message says how to get them."""


def parse_idx(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of one IDX file (already un-gzipped) into a tensor of its shape."""
    if len(data) < 4:
        raise IDXFormatError(f"{name}: {len(data)} bytes is too short for an IDX header (4-byte magic number)")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{name}: not an IDX file: the magic number must start with two zero bytes, got "
            f"0x{data[0]:02x} 0x{data[1]:02x}"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_TYPES:
        known = ", ".join(f"0x{code:02x}" for code in _IDX_TYPES)
        raise IDXFormatError(f"{name}: unknown IDX type code 0x{type_code:02x} (known: {known})")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise IDXFormatError(f"{name}: truncated header: {ndim} dimensions need {header_bytes} bytes, got {len(data)}")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IDXFormatError(
            f"{name}: header says shape {shape} of {dtype.name} ({expected} bytes in all), but the file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_bytes).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file; gzip is recognised by its magic bytes, whatever the file is called."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return parse_idx(data, name=os.fspath(path))


def missing_dataset_message(data_dir: str, missing: list[str]) -> str:
    lines = [f"Fashion-MNIST not found in {data_dir} (missing: {', '.join(missing)})."]
    if os.path.abspath(data_dir) == DEBIAN_DIR:
        lines.append(f"On Debian or Ubuntu install it with:  sudo apt-get install {DEBIAN_PACKAGE}")
    else:
        lines.append(f"On Debian or Ubuntu `sudo apt-get install {DEBIAN_PACKAGE}` puts it in {DEBIAN_DIR}.")
    lines.append(
        "Elsewhere, download the four files of https://github.com/zalandoresearch/fashion-mnist "
        f"({', '.join(f + '.gz' for f in FASHION_MNIST_FILES.values())}) into a folder and pass --data FOLDER."
    )
    return "\n".join(lines)


def find_fashion_mnist(data_dir: str = DEBIAN_DIR) -> dict[str, str]:
    """Paths of the four files in `data_dir` (plain or .gz); DatasetNotFoundError if any is missing."""
    paths, missing = {}, []
    for role, stem in FASHION_MNIST_FILES.items():
        for candidate in (stem, stem + ".gz"):
            path = os.path.join(data_dir, candidate)
            if os.path.isfile(path):
                paths[role] = path
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise DatasetNotFoundError(missing_dataset_message(data_dir, missing))
    return paths


def load_fashion_mnist(data_dir: str = DEBIAN_DIR) -> dict[str, torch.Tensor]:
    """The four tensors: train_images (60000, 28, 28) uint8, train_labels (60000,) int64, and test_*."""
    tensors = {role: read_idx(path) for role, path in find_fashion_mnist(data_dir).items()}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise IDXFormatError(
                f"{data_dir}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair up "
                "as (N, H, W) images with (N,) labels"
            )
        tensors[f"{split}_labels"] = labels.long()
    return tensors


if __name__ == "__main__":  # quick look: python -m fused_ls.demo.idx [FOLDER]
    for role, tensor in load_fashion_mnist(*sys.argv[1:2]).items():
        print(f"{role:13s} {tuple(tensor.shape)} {tensor.dtype} min {int(tensor.min())} max {int(tensor.max())}")
