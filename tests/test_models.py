"""Tests for the model zoo in ``crdnd_ray.models``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from crdnd_ray.models import (
    MODELS,
    MobileNetV2,
    Normalized,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    count_parameters,
)

SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "small_cnn": {"width": 8},
    "resnet18": {},
    "mobilenetv2": {},
    "wideresnet": {"depth": 10, "widen_factor": 1},
}
INPUT_SIZE: dict[str, int] = {"small_cnn": 8, "resnet18": 32, "mobilenetv2": 32, "wideresnet": 32}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _small(arch: str, num_classes: int = 7, in_channels: int = 3) -> nn.Module:
    return build_model(arch, num_classes=num_classes, in_channels=in_channels, **SMALL_CONFIGS[arch])


def test_registry_names_and_small_configs_cover_every_model() -> None:
    assert set(MODELS) == {"small_cnn", "resnet18", "mobilenetv2", "wideresnet"}
    assert set(SMALL_CONFIGS) == set(MODELS)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_shapes_features_and_input_gradients(arch: str) -> None:
    model = _small(arch, num_classes=7, in_channels=3)
    assert isinstance(model, MODELS[arch])
    assert isinstance(model.feature_dim, int) and model.feature_dim > 0
    size = INPUT_SIZE[arch]
    x = torch.rand(2, 3, size, size, requires_grad=True)

    logits, features = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert features.shape == (2, model.feature_dim)
    (logits.sum() + features.sum()).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        plain = model(x)
        again, _ = model(x, return_features=True)
    assert isinstance(plain, torch.Tensor)
    assert plain.shape == (2, 7)
    torch.testing.assert_close(plain, again)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (4, 13)])
def test_adaptive_pooling_accepts_other_shapes(arch: str, in_channels: int, size: int) -> None:
    model = _small(arch, num_classes=5, in_channels=in_channels).eval()
    with torch.no_grad():
        logits, features = model(torch.rand(2, in_channels, size, size), return_features=True)
    assert logits.shape == (2, 5)
    assert features.shape == (2, model.feature_dim)


def test_small_cnn_defaults_on_digits() -> None:
    model = SmallCNN(num_classes=10, in_channels=1)
    assert model.feature_dim == 128
    logits, features = model(torch.rand(64, 1, 8, 8), return_features=True)
    assert logits.shape == (64, 10)
    assert features.shape == (64, 128)
    assert count_parameters(model) < 150_000


def test_feature_dims_of_the_full_size_models() -> None:
    with torch.device("meta"):
        assert ResNet18(num_classes=10).feature_dim == 512
        assert MobileNetV2(num_classes=10).feature_dim == 1280
        assert WideResNet(num_classes=10).feature_dim == 640
        assert WideResNet(num_classes=10, depth=28, widen_factor=4).feature_dim == 256


# Published sizes for 10 classes, 3 input channels:
# - ResNet-18 (kuangliu/pytorch-cifar models/resnet.py): 11,173,962.
# - WRN-34-10 (TRADES models/wideresnet.py, RobustBench
#   model_zoo/architectures/wide_resnet.py with sub_block1=False): 46,160,474.
# - MobileNetV2 (kuangliu/pytorch-cifar models/mobilenetv2.py): 2,296,922.
# Going from 10 to 100 classes adds 90 rows of (feature_dim weights + 1 bias)
# to the final linear layer: 90 * 513, 90 * 641 and 90 * 1281.  The totals
# were also re-derived by hand, layer by layer, from the two reference files.
@pytest.mark.parametrize(
    ("arch", "kwargs", "expected_10", "expected_100"),
    [
        ("resnet18", {}, 11_173_962, 11_220_132),
        ("wideresnet", {"depth": 34, "widen_factor": 10}, 46_160_474, 46_218_164),
        ("mobilenetv2", {}, 2_296_922, 2_296_922 + 90 * 1281),
    ],
)
def test_parameter_counts_match_published_architectures(
    arch: str, kwargs: dict[str, Any], expected_10: int, expected_100: int
) -> None:
    with torch.device("meta"):
        model_10 = build_model(arch, num_classes=10, in_channels=3, **kwargs)
        model_100 = build_model(arch, num_classes=100, in_channels=3, **kwargs)
    assert count_parameters(model_10) == expected_10
    assert count_parameters(model_100) == expected_100
    assert expected_100 - expected_10 == 90 * (model_100.feature_dim + 1)


def test_wideresnet_sub_block1_adds_an_unused_copy_of_block1() -> None:
    with torch.device("meta"):
        plain = WideResNet(num_classes=10)
        with_sub = WideResNet(num_classes=10, sub_block1=True)
    assert count_parameters(with_sub) - count_parameters(plain) == count_parameters(plain.block1)
    assert count_parameters(with_sub) == 48_262_586


def _robustbench_keys(depth: int, widen_factor: int, sub_block1: bool) -> set[str]:
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    stages = [
        ("block1", widths[0], widths[1]),
        ("block2", widths[1], widths[2]),
        ("block3", widths[2], widths[3]),
    ]
    if sub_block1:
        stages.append(("sub_block1", widths[0], widths[1]))
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in BN_KEYS}
    for name, in_planes, out_planes in stages:
        for i in range(n):
            prefix = f"{name}.layer.{i}"
            keys |= {f"{prefix}.bn1.{k}" for k in BN_KEYS} | {f"{prefix}.bn2.{k}" for k in BN_KEYS}
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            if i == 0 and in_planes != out_planes:
                keys.add(f"{prefix}.convShortcut.weight")
    return keys


@pytest.mark.parametrize(("depth", "widen_factor"), [(10, 1), (16, 2), (34, 10)])
@pytest.mark.parametrize("sub_block1", [False, True])
def test_wideresnet_state_dict_keys_follow_robustbench(
    depth: int, widen_factor: int, sub_block1: bool
) -> None:
    with torch.device("meta"):
        model = WideResNet(num_classes=10, depth=depth, widen_factor=widen_factor, sub_block1=sub_block1)
    assert set(model.state_dict()) == _robustbench_keys(depth, widen_factor, sub_block1)


def test_wideresnet_sub_block1_keys_are_a_superset_and_do_not_change_outputs() -> None:
    plain = WideResNet(num_classes=10, depth=16, widen_factor=2).eval()
    with_sub = WideResNet(num_classes=10, depth=16, widen_factor=2, sub_block1=True).eval()
    plain_keys, sub_keys = set(plain.state_dict()), set(with_sub.state_dict())
    assert plain_keys < sub_keys
    assert all(key.startswith("sub_block1.") for key in sub_keys - plain_keys)

    result = with_sub.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    new_keys = sub_keys - plain_keys
    assert set(result.missing_keys) == {k for k in new_keys if not k.endswith("num_batches_tracked")}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_sub(x), plain(x))

    with_sub.train()
    with_sub(x).sum().backward()
    assert all(p.grad is None for p in with_sub.sub_block1.parameters())
    assert with_sub.block1.layer[0].conv1.weight.grad is not None

    WideResNet(num_classes=10, depth=16, widen_factor=2, sub_block1=True).load_state_dict(
        with_sub.state_dict(), strict=True
    )


@pytest.mark.parametrize("depth", [8, 12, 0])
def test_wideresnet_rejects_invalid_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet(num_classes=10, depth=depth)


def test_build_model_forwards_arch_kwargs() -> None:
    model = build_model("wideresnet", num_classes=4, in_channels=1, depth=10, widen_factor=2)
    assert isinstance(model, WideResNet)
    assert model.feature_dim == 128
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == 4
    assert build_model("small_cnn", num_classes=3, in_channels=1, width=4).feature_dim == 16


def test_unknown_arch_raises_value_error_listing_choices() -> None:
    with pytest.raises(ValueError, match="resnet50") as info:
        build_model("resnet50", num_classes=10, in_channels=3)
    message = str(info.value)
    for name in MODELS:
        assert name in message


def test_count_parameters_trainable_only() -> None:
    model = SmallCNN(num_classes=10, in_channels=1, width=4)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - (16 * 10 + 10)
    assert count_parameters(model) == total


def test_normalized_standardises_inputs_and_forwards_features() -> None:
    inner = SmallCNN(num_classes=4, in_channels=3, width=4).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    wrapped = Normalized(inner, mean, std).eval()
    assert wrapped.feature_dim == inner.feature_dim
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    expected_x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    logits, features = wrapped(x, return_features=True)
    expected_logits, expected_features = inner(expected_x, return_features=True)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(wrapped(x), expected_logits)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    assert set(wrapped.state_dict()) == {f"model.{key}" for key in inner.state_dict()}
    assert wrapped.double().mean.dtype == torch.float64


def test_normalized_rejects_bad_statistics() -> None:
    model = SmallCNN(num_classes=2, in_channels=3, width=4)
    with pytest.raises(ValueError, match="equal length"):
        Normalized(model, (0.5, 0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ValueError, match="positive"):
        Normalized(model, (0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
