"""Data: sources (IDX, Omniglot zips, class folders, CSV manifest), protocols and splits,
decoding and preprocessing."""

from hwnas.data.images import ImageArray, Preprocess, materialize
from hwnas.data.sources import (
    Collection, digits, fashion_mnist, image_folder, load_source, manifest, omniglot,
)
from hwnas.data.splits import PARTS, SplitConfig, Splits, make_splits

__all__ = [
    "Collection", "ImageArray", "PARTS", "Preprocess", "SplitConfig", "Splits", "digits",
    "fashion_mnist", "image_folder", "load_source", "make_splits", "manifest", "materialize",
    "omniglot",
]
