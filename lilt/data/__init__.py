"""Pair data: sources (`load_pairs`), the built-in sets, transforms and collation, loaders."""

from .loader import EpochSampler, PairTable, pair_loader
from .sources import BUILTINS, DataError, load_labelled, load_pairs, select_pairs
from .transforms import AUGMENTATIONS, PairCollator, decode_image, image_transform, ssl_view_transform

__all__ = ["AUGMENTATIONS", "BUILTINS", "DataError", "EpochSampler", "PairCollator", "PairTable", "decode_image",
           "image_transform", "load_labelled", "load_pairs", "pair_loader", "select_pairs", "ssl_view_transform"]
