"""Datasets: scikit-learn's digits (the embedded default) and torchvision's CIFAR-10/100.

Every dataset yields image tensors in [0, 1] (never normalised: models that need normalisation do it
inside) and integer labels. ``synthetic`` (:class:`SyntheticImages`) has CIFAR-100's shapes and sizes
but random content; it exists for throughput benchmarks only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from crdnd_ray.config import DataConfig

__all__ = ["CIFAR_FOLDERS", "DataError", "DatasetInfo", "SyntheticImages", "build_datasets", "dataset_info",
           "require_data"]


class DataError(Exception):
    """A dataset cannot be loaded; the message says where it was looked for and how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts the models need, and the size of the training set (before ``train_limit``)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DIGITS_TRAIN_SIZE = 1347
"""The training part of scikit-learn's 1,797 digits under the fixed 75/25 split."""
CIFAR_FILES = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "cifar100": ["train", "test"]}
"""The files of torchvision's extracted archives that the loaders read."""


def require_data(cfg: DataConfig) -> None:
    """Refuse, before any work, a dataset that is not on disk and will not be downloaded (DataError).

    Cheap: it checks that torchvision's files exist, without reading them.
    """
    if cfg.name not in CIFAR_FOLDERS or cfg.download:
        return
    root = Path(cfg.root).expanduser()
    folder = root / CIFAR_FOLDERS[cfg.name]
    missing = [name for name in CIFAR_FILES[cfg.name] if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"The {cfg.name} dataset is not in '{folder}' (missing {', '.join(missing)}) and data.download is "
            f"false. Either set data.download: true (or --set data.download=true) on a machine with internet, or "
            f"put torchvision's extracted '{CIFAR_FOLDERS[cfg.name]}' folder under data.root='{root}'."
        )


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes, channels and image size of the configured dataset, without loading it."""
    if cfg.name == "digits":
        return DatasetInfo("digits", 10, 1, cfg.image_size or 8, DIGITS_TRAIN_SIZE)
    if cfg.name == "synthetic":
        return DatasetInfo("synthetic", 100, 3, cfg.image_size or 32, 50_000)
    return DatasetInfo(cfg.name, 10 if cfg.name == "cifar10" else 100, 3, 32, 50_000)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """The training and test datasets of ``cfg`` plus their shape facts.

    ``train_limit`` / ``test_limit`` keep the first N examples (for quick runs and tests).
    """
    if cfg.name == "digits":
        train, test = _digits(cfg)
    elif cfg.name == "synthetic":
        info = dataset_info(cfg)
        shape = (info.in_channels, info.image_size, info.image_size)
        train = SyntheticImages(50_000, info.num_classes, shape, seed=0)
        test = SyntheticImages(10_000, info.num_classes, shape, seed=1)
    else:
        train, test = _cifar(cfg)
    if cfg.train_limit is not None:
        train = Subset(train, range(min(cfg.train_limit, len(train))))
    if cfg.test_limit is not None:
        test = Subset(test, range(min(cfg.test_limit, len(test))))
    return train, test, dataset_info(cfg)


class SyntheticImages(Dataset):
    """Uniform random images in [0, 1] with uniform random labels: CIFAR-shaped data for benchmarks only.

    Nothing is stored: example ``i`` is drawn from a generator seeded with ``(seed, i)``, so every
    process and every epoch sees the same example at the same index, and building the dataset is free.
    There is nothing to learn in it; use it to time training, never to judge accuracy.
    """

    def __init__(self, length: int, num_classes: int, shape: tuple[int, ...], seed: int = 0) -> None:
        self.length = length
        self.num_classes = num_classes
        self.shape = shape
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside the {self.length} synthetic examples")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.rand(self.shape, generator=generator)
        label = torch.randint(self.num_classes, (), generator=generator)
        return image, label


def _digits(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8×8 digits with a fixed stratified 75/25 split (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    if cfg.image_size and cfg.image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(
            images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
        ).clamp(0, 1)
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=0, stratify=digits.target
    )
    return (
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[test_index], labels[test_index]),
    )


def _cifar(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """torchvision's CIFAR-10/100 under ``cfg.root`` with the standard crop-and-flip augmentation."""
    from torchvision import datasets, transforms

    dataset_class = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    to_tensor = transforms.ToTensor()
    train_transform = (
        transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), to_tensor])
        if cfg.augment
        else to_tensor
    )
    root = Path(cfg.root).expanduser()
    try:
        train = dataset_class(str(root), train=True, download=cfg.download, transform=train_transform)
        test = dataset_class(str(root), train=False, download=cfg.download, transform=to_tensor)
    except RuntimeError as error:
        folder = root / CIFAR_FOLDERS[cfg.name]
        raise DataError(
            f"The {cfg.name} dataset was not found (or is corrupted) in '{folder}' ({error}). "
            f"Either set data.download: true (or --set data.download=true) on a machine with internet, or "
            f"put torchvision's extracted '{CIFAR_FOLDERS[cfg.name]}' folder under data.root='{root}'."
        ) from None
    except OSError as error:
        raise DataError(
            f"Downloading {cfg.name} into '{root}' failed ({error}). Check the internet connection, or "
            f"download it elsewhere and copy the '{CIFAR_FOLDERS[cfg.name]}' folder under '{root}'."
        ) from None
    return train, test
