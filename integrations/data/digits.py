"""The demo's images: scikit-learn's digits (shipped with scikit-learn, no download) or a
torchvision ImageFolder, as PIL images with labels; the one digits loader of the project (the
demo and the tests use it).

Example:
    >>> from smooth_infonce.integrations.data.digits import digit_images, load_digits_images
    >>> images, labels = digit_images(4, size=16)
    >>> images[0].size, images[0].mode, labels
    ((16, 16), 'RGB', [0, 1, 2, 3])
    >>> len(load_digits_images(8))
    1797
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Tuple

import numpy as np

from smooth_infonce.integrations.recipes import CropSpec, ViewSpec

NUM_DIGITS = 1797  # images in scikit-learn's load_digits: 8 x 8 px, 10 classes


class ImageList:
    """(PIL image, label) pairs, loaded lazily from an ImageFolder or held in memory."""

    def __init__(self, images: Sequence, labels: Sequence[int], loader=None) -> None:
        self.images, self.labels, self.loader = list(images), [int(v) for v in labels], loader

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int):
        image = self.images[index]
        return self.loader(image) if self.loader is not None else image

    def __getitem__(self, index: int):
        """``(PIL image, label)``, as a torchvision dataset (for `PretrainDataModule`)."""
        return self.image(index), self.labels[index]

    def subset(self, indices: Sequence[int]) -> "ImageList":
        return ImageList([self.images[i] for i in indices], [self.labels[i] for i in indices], self.loader)


@lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_images(count: int = NUM_DIGITS, size: int = 16, offset: int = 0) -> Tuple[List, List[int]]:
    """``count`` real handwritten digits from ``offset`` on, as RGB PIL images of ``size`` px
    (bicubic upsampling of the 8 x 8 originals), and their labels."""
    from PIL import Image

    digits = _digits()
    images = [
        Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8))  # values are 0..16
        .resize((size, size), Image.BICUBIC).convert("RGB")
        for pixels in digits.images[offset:offset + count]
    ]
    return images, digits.target[offset:offset + count].tolist()


def load_digits_images(image_size: int) -> ImageList:
    """All 1797 digits as RGB PIL images of ``image_size`` px."""
    return ImageList(*digit_images(NUM_DIGITS, size=image_size))


def load_image_folder(path: str) -> ImageList:
    """A torchvision ImageFolder (one folder per class), loaded lazily."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(path)
    return ImageList([p for p, _ in folder.samples], [c for _, c in folder.samples], loader=folder.loader)


def split_indices(labels: Sequence[int], test_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train, test) indices, stratified by label when every class has two images or more."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    stratify = labels if min(np.bincount(labels)) >= 2 else None
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=stratify)
    return sorted(train.tolist()), sorted(test.tolist())


def stratified_subset(labels: Sequence[int], count: int, seed: int) -> List[int]:
    """``count`` indices drawn without replacement, with every class in its share (sorted)."""
    from sklearn.model_selection import train_test_split

    if count >= len(labels):
        return list(range(len(labels)))
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=count, random_state=seed, stratify=labels)
    return sorted(chosen.tolist())


def digits_views(image_size: int) -> ViewSpec:
    """Views for small grey digits: no flip (digits are not mirror-symmetric), no colour or blur
    (nothing to jitter, and a blur erases an 8 px glyph), crops of at least 40 % of the area."""
    return ViewSpec(
        global_crops=CropSpec(2, image_size, (0.4, 1.0)), interpolation="bicubic", hflip_prob=0.0,
        color_jitter=(0.4, 0.4, 0.0, 0.0), color_jitter_prob=0.8, grayscale_prob=0.0, blur_prob=0.0,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )
