"""Datasets: the digits split, and a tiny CIFAR-100 in torchvision's on-disk format loaded by the real loader."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets
from typer.testing import CliRunner

from crdnd_ray.checkpoints import save_model
from crdnd_ray.cli import app
from crdnd_ray.config import DataConfig
from crdnd_ray.data import DataError, build_datasets, dataset_info
from crdnd_ray.models import build_model

N_TRAIN, N_TEST = 20, 10


# --- digits ----------------------------------------------------------------------------------------------


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images, labels


def test_digits_split_is_fixed_and_stratified():
    train, test, info = build_datasets(DataConfig(name="digits"))
    assert (len(train), len(test)) == (1347, 450)
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == 8
    train_x, train_y = _tensors(train)
    test_x, test_y = _tensors(test)
    again_train, again_test, _ = build_datasets(DataConfig(name="digits", batch_size=7))
    assert torch.equal(_tensors(again_train)[0], train_x) and torch.equal(_tensors(again_test)[1], test_y)
    train_counts, test_counts = Counter(train_y.tolist()), Counter(test_y.tolist())
    assert sorted(test_counts) == list(range(10))
    for label in range(10):
        share = test_counts[label] / (train_counts[label] + test_counts[label])
        assert abs(share - 0.25) < 0.02, f"class {label} is not split 75/25: {share:.3f}"
    # No test image is also a training image.
    train_rows = {tuple(row) for row in train_x.flatten(1).tolist()}
    overlap = sum(tuple(row) in train_rows for row in test_x.flatten(1).tolist())
    assert overlap <= 2, f"{overlap} test images also occur in the training split"


def test_digits_tensors_are_in_unit_range():
    train, test, _ = build_datasets(DataConfig(name="digits"))
    for images, labels in (_tensors(train), _tensors(test)):
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8)
        assert images.min() >= 0 and images.max() <= 1
        assert images.max() == 1.0, "pixels are scaled by 1/16, so the brightest pixel is exactly 1"
        assert labels.dtype == torch.long and labels.min() == 0 and labels.max() == 9


def test_digits_resize():
    cfg = DataConfig(name="digits", image_size=16)
    train, test, info = build_datasets(cfg)
    assert info.image_size == 16 and dataset_info(cfg).image_size == 16
    images, _ = _tensors(test)
    assert images.shape[1:] == (1, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    small, _ = _tensors(build_datasets(DataConfig(name="digits"))[1])
    shrunk = torch.nn.functional.avg_pool2d(images, 2)
    assert torch.allclose(shrunk.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.05), \
        "the resized images show the same digits"
    assert len(train) == 1347


def test_limits_keep_the_first_examples():
    full_train, full_test, _ = build_datasets(DataConfig(name="digits"))
    train, test, _ = build_datasets(DataConfig(name="digits", train_limit=100, test_limit=30))
    assert (len(train), len(test)) == (100, 30)
    assert torch.equal(train[5][0], full_train[5][0]) and torch.equal(test[29][0], full_test[29][0])


# --- a tiny CIFAR-100 on disk ----------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, payload: dict) -> str:
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    return _md5(path)


@pytest.fixture
def tiny_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Write a 20 + 10 image CIFAR-100 under ``tmp_path/data/cifar-100-python`` in torchvision's format.

    The real archive's pickles are Python 2 dicts whose ``str`` keys torchvision reads with
    ``encoding="latin1"``, so they arrive as ``str``: ``data`` (uint8 N×3072, channel-major),
    ``fine_labels``, ``coarse_labels``, ``filenames``; ``meta`` holds ``fine_label_names`` and
    ``coarse_label_names``. torchvision checks each file's md5 against the real archive's, so the class's
    md5 lists are pointed at the files written here.
    """
    root = tmp_path / "data"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    md5s = {}
    for name, count in (("train", N_TRAIN), ("test", N_TEST)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=count)]
        payload = {"data": data, "fine_labels": fine, "coarse_labels": [v // 5 for v in fine],
                   "filenames": [f"{name}_{i}.png" for i in range(count)], "batch_label": f"{name} batch"}
        md5s[name] = _write_pickle(folder / name, payload)
        splits[name] = (data, fine)
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    md5s["meta"] = _write_pickle(folder / "meta", meta)
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", md5s["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", md5s["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                                    "md5": md5s["meta"]})
    return {"root": root, "folder": folder, "splits": splits}


def _as_image(row: np.ndarray) -> torch.Tensor:
    """One raw CIFAR row (R plane, G plane, B plane) as a CHW float tensor in [0, 1]."""
    return torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)


def test_tiny_cifar100_loads_through_torchvision(tiny_cifar100):
    cfg = DataConfig(name="cifar100", root=str(tiny_cifar100["root"]), augment=False)
    train, test, info = build_datasets(cfg)
    assert isinstance(train, datasets.CIFAR100) and isinstance(test, datasets.CIFAR100)
    assert (info.num_classes, info.in_channels, info.image_size) == (100, 3, 32)
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert train.classes[:2] == ["fine_0", "fine_1"] and len(train.classes) == 100
    for dataset, split in ((train, "train"), (test, "test")):
        data, fine = tiny_cifar100["splits"][split]
        for index in (0, len(dataset) - 1):
            image, label = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert 0 <= image.min() and image.max() <= 1, "inputs are never normalised"
            assert label == fine[index]
            assert torch.allclose(image, _as_image(data[index]), atol=1e-6)


def test_cifar_augmentation_changes_train_images_only(tiny_cifar100):
    cfg = DataConfig(name="cifar100", root=str(tiny_cifar100["root"]), augment=True)
    train, test, _ = build_datasets(cfg)
    train_data, _ = tiny_cifar100["splits"]["train"]
    test_data, _ = tiny_cifar100["splits"]["test"]
    torch.manual_seed(0)
    raw = _as_image(train_data[3])
    draws = [train[3][0] for _ in range(8)]
    assert all(draw.shape == (3, 32, 32) for draw in draws)
    assert any(not torch.equal(draw, raw) for draw in draws), "random crop and flip change the image"
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:]), "each draw is a new random view"
    # A crop with padding 4 is a shift of at most 4 pixels (zeros coming in) and possibly a flip.
    for draw in draws:
        candidates = [raw, raw.flip(-1)]
        padded = [torch.nn.functional.pad(c, (4, 4, 4, 4)) for c in candidates]
        found = any(torch.equal(draw, p[:, dy:dy + 32, dx:dx + 32]) for p in padded
                    for dy in range(9) for dx in range(9))
        assert found, "an augmented image is a padded crop (maybe flipped) of the original"
    for _ in range(3):
        assert torch.equal(test[2][0], _as_image(test_data[2])), "test images are never augmented"


def test_cifar_train_limit_and_loader(tiny_cifar100):
    cfg = DataConfig(name="cifar100", root=str(tiny_cifar100["root"]), train_limit=8, test_limit=4)
    train, test, _ = build_datasets(cfg)
    assert (len(train), len(test)) == (8, 4)
    images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long


def test_missing_cifar_raises_a_clear_data_error(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as caught:
        build_datasets(DataConfig(name="cifar100", root=str(root), download=False))
    message = str(caught.value)
    assert str(root / "cifar-100-python") in message
    assert "data.download" in message and "cifar-100-python" in message
    assert not root.exists() or not any(root.iterdir()), "nothing is downloaded with download off"
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_datasets(DataConfig(name="cifar10", root=str(root)))


def test_corrupted_cifar_is_a_data_error(tiny_cifar100):
    (tiny_cifar100["folder"] / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="corrupted"):
        build_datasets(DataConfig(name="cifar100", root=str(tiny_cifar100["root"])))


def test_cli_evaluate_on_missing_cifar_exits_2(tmp_path):
    checkpoint = save_model(tmp_path / "model.pt", build_model("small_cnn", num_classes=100, in_channels=3, width=4),
                            "small_cnn", {"width": 4}, num_classes=100, in_channels=3)
    root = tmp_path / "no-data-here"
    result = CliRunner().invoke(app, [
        "evaluate", str(checkpoint), "--attacks", "clean", "--limit", "4", "--json", str(tmp_path / "out.json"),
        "--set", "data.name=cifar100", "--set", f"data.root={root}", "--set", "tracking.enabled=false",
    ])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message
    assert str(root / "cifar-100-python") in message and "data.download" in message
    assert not (tmp_path / "out.json").exists()


def test_cli_evaluate_on_tiny_cifar100(tiny_cifar100, tmp_path):
    """The same command works once the files are there (clean accuracy only; the model is untrained)."""
    checkpoint = save_model(tmp_path / "model.pt", build_model("small_cnn", num_classes=100, in_channels=3, width=4),
                            "small_cnn", {"width": 4}, num_classes=100, in_channels=3)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, [
        "evaluate", str(checkpoint), "--attacks", "clean,fgsm", "--json", str(out),
        "--set", "data.name=cifar100", "--set", f"data.root={tiny_cifar100['root']}",
        "--set", "eval.eps=8/255", "--set", "tracking.enabled=false",
    ])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["n_eval"] == N_TEST
    assert results["eps"] == pytest.approx(8 / 255)
    assert 0 <= results["fgsm_acc"] <= 100 and 0 <= results["clean_acc"] <= 100


# --- synthetic (benchmarks only) ---------------------------------------------------------------------


def test_synthetic_data_is_cifar100_shaped_seeded_and_never_stored():
    cfg = DataConfig(name="synthetic", train_limit=16)
    train, test, info = build_datasets(cfg)
    assert (info.num_classes, info.in_channels, info.image_size) == (100, 3, 32)
    assert len(train) == 16 and len(test) == 10_000
    images, labels = _tensors(train)
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() < 100
    again, _, _ = build_datasets(cfg)
    assert torch.equal(_tensors(again)[0], images)
    assert not torch.equal(test[0][0], train[0][0])
    with pytest.raises(IndexError):
        test[10_000]
