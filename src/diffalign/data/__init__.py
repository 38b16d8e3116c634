"""Offline data: episodes, readers/writers, training windows and normalisers."""

from diffalign.data.episodes import DatasetError, Episodes
from diffalign.data.normalizer import (
    GaussianNormalizer,
    MinMaxNormalizer,
    Normalizer,
    NormalizerSet,
    make_normalizer,
)
from diffalign.data.readers import (
    load_dataset,
    read_d4rl_hdf5,
    read_minari,
    read_robomimic_hdf5,
    write_d4rl_hdf5,
    write_robomimic_hdf5,
)
from diffalign.data.windows import WindowDataset, make_windows, window_indices

__all__ = [
    "DatasetError",
    "Episodes",
    "GaussianNormalizer",
    "MinMaxNormalizer",
    "Normalizer",
    "NormalizerSet",
    "WindowDataset",
    "load_dataset",
    "make_normalizer",
    "make_windows",
    "read_d4rl_hdf5",
    "read_minari",
    "read_robomimic_hdf5",
    "window_indices",
    "write_d4rl_hdf5",
    "write_robomimic_hdf5",
]
