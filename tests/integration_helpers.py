"""Small shared helpers for the integration tests: real digit images from the project's one
digits loader (`smooth_infonce.integrations.data.digits`, scikit-learn's bundled digits, no download),
Fashion-MNIST's four IDX files made up at the official counts (no Debian package needed), and a free
port for the multi-process tests."""

import socket

import numpy as np

from smooth_infonce.integrations.data import fashion_mnist as fm
from smooth_infonce.integrations.data.digits import digit_images

__all__ = ["digit_images", "fake_fashion_mnist", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the rendezvous of a spawned gloo group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_fashion_mnist(folder, gz: bool = True, seed: int = 0):
    """The four files at the official counts: 10 class templates plus noise (learnable, not trivial)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (10, 28, 28)).astype(np.int16)
    arrays = {}
    for split, (prefix, count) in fm.SPLITS.items():
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = np.clip(templates[labels] + rng.integers(-90, 90, (count, 28, 28)), 0, 255).astype(np.uint8)
        suffix = ".gz" if gz else ""
        fm.write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        fm.write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays

