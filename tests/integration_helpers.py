"""Small shared helpers for the integration tests: real digit images from scikit-learn."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np
from PIL import Image


@lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_images(count: int, size: int = 16, offset: int = 0) -> Tuple[List[Image.Image], List[int]]:
    """``count`` real handwritten digits (scikit-learn, no download) as RGB PIL images."""
    digits = _digits()
    images = [
        Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")
        for pixels in digits.images[offset:offset + count]
    ]
    return images, digits.target[offset:offset + count].tolist()
