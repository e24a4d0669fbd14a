"""Checkpoints: round trips, weights-only loading, clear errors, and RobustBench state dicts."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from crdnd_ray.checkpoints import CheckpointError, load_model, read_checkpoint, save_model
from crdnd_ray.models import Normalized, WideResNet, build_model


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic non-default values, so a lost weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@pytest.fixture
def digits_model():
    return _trained_like(build_model("small_cnn", num_classes=10, in_channels=1, width=8))


def _outputs(model: torch.nn.Module, shape=(4, 1, 8, 8)) -> torch.Tensor:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def test_round_trip_gives_the_same_outputs(tmp_path, digits_model):
    path = save_model(tmp_path / "sub" / "model.pt", digits_model, "small_cnn", {"width": 8}, num_classes=10,
                      in_channels=1, extra={"epoch": 3})
    assert path.exists() and not path.with_suffix(".pt.tmp").exists()
    loaded = load_model(path)
    assert type(loaded) is type(digits_model)
    assert torch.equal(_outputs(loaded), _outputs(digits_model))
    again = load_model(path, arch="small_cnn", num_classes=10, in_channels=1)
    assert torch.equal(_outputs(again), _outputs(digits_model))
    payload = read_checkpoint(path)
    assert payload["epoch"] == 3 and payload["kwargs"] == {"width": 8} and payload["arch"] == "small_cnn"


def test_round_trip_of_a_wrapped_model_saves_the_plain_weights(tmp_path, digits_model):
    wrapped = torch.nn.DataParallel(digits_model)
    path = save_model(tmp_path / "model.pt", wrapped, "small_cnn", {"width": 8}, num_classes=10, in_channels=1)
    assert not any(key.startswith("module.") for key in read_checkpoint(path)["state_dict"])
    assert torch.equal(_outputs(load_model(path)), _outputs(digits_model))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing.pt")


def test_random_bytes_are_a_checkpoint_error(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    assert str(path) in str(caught.value) and "corrupt" in str(caught.value)


def test_truncated_file_is_a_checkpoint_error(tmp_path, digits_model):
    path = save_model(tmp_path / "model.pt", digits_model, "small_cnn", {"width": 8}, num_classes=10, in_channels=1)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        broken = tmp_path / f"truncated-{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt, truncated"):
            load_model(broken)


def test_not_a_dict_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(path)


def test_wrong_num_classes_is_refused_clearly(tmp_path, digits_model):
    path = save_model(tmp_path / "model.pt", digits_model, "small_cnn", {"width": 8}, num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, num_classes=100, in_channels=1)
    message = str(caught.value)
    assert "num_classes=10" in message and "100" in message and str(path) in message
    with pytest.raises(CheckpointError, match="in_channels=1"):
        load_model(path, num_classes=10, in_channels=3)


def test_wrong_architecture_is_refused_clearly(tmp_path, digits_model):
    path = save_model(tmp_path / "model.pt", digits_model, "small_cnn", {"width": 8}, num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="arch='small_cnn'.*'wideresnet'"):
        load_model(path, arch="wideresnet")


def test_weights_that_do_not_fit_are_refused_clearly(tmp_path, digits_model):
    """A checkpoint whose metadata claims width 16 but holds width-8 weights."""
    path = save_model(tmp_path / "model.pt", digits_model, "small_cnn", {"width": 16}, num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "do not fit the configured model" in message and "size mismatch" in message
    assert "Traceback" not in message


def test_a_plain_state_dict_is_not_a_crdnd_checkpoint(tmp_path, digits_model):
    path = tmp_path / "plain.pt"
    torch.save(digits_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="robustbench"):
        load_model(path)


class Payload:
    """A custom class: unpickling it needs code, which weights_only loading refuses."""

    def __init__(self) -> None:
        self.value = 1


def test_pickled_custom_object_is_refused(tmp_path, digits_model):
    path = tmp_path / "evil.pt"
    torch.save({"format": "crdnd-ray/1", "arch": "small_cnn", "kwargs": {"width": 8}, "num_classes": 10,
                "in_channels": 1, "state_dict": digits_model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects") as caught:
        load_model(path)
    message = str(caught.value)
    assert "UnpicklingError" in message, "refused by the weights-only unpickler, not by accident"
    assert "weights_only=False" not in message and "two options" not in message, "never suggest the unsafe load"
    torch.load(path, weights_only=False)  # the file itself is fine: only the safe loader refuses it


# --- RobustBench -----------------------------------------------------------------------------------------


@pytest.fixture
def robustbench_wrn():
    torch.manual_seed(0)
    return _trained_like(WideResNet(depth=10, widen_factor=1, num_classes=10, sub_block1=True))


def _with_prefix(state: dict, prefix: str) -> collections.OrderedDict:
    return collections.OrderedDict((prefix + key, value) for key, value in state.items())


@pytest.mark.parametrize("layout", ["wrapped", "bare", "bare-no-prefix"])
def test_robustbench_state_dict_loads_with_the_same_outputs(tmp_path, robustbench_wrn, layout):
    state = robustbench_wrn.state_dict()
    assert any(key.startswith("sub_block1.") for key in state)
    if layout == "wrapped":
        payload = {"state_dict": _with_prefix(state, "module."), "epoch": 99}
    elif layout == "bare":
        payload = _with_prefix(state, "module.")
    else:
        payload = state
    path = tmp_path / "Carmon2019Unlabeled.pt"
    torch.save(payload, path)
    model = load_model(path, arch="wideresnet", kwargs={"depth": 10, "widen_factor": 1}, num_classes=10,
                       in_channels=3, checkpoint_format="robustbench")
    assert isinstance(model, WideResNet) and not hasattr(model, "sub_block1")
    shape = (3, 3, 32, 32)
    assert torch.allclose(_outputs(model, shape), _outputs(robustbench_wrn, shape), atol=1e-6)


def test_robustbench_normalisation_is_honoured(tmp_path, robustbench_wrn):
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    state = _with_prefix(robustbench_wrn.state_dict(), "module.")
    state["module.mu"] = torch.tensor(mean).view(1, 3, 1, 1)
    state["module.sigma"] = torch.tensor(std).view(1, 3, 1, 1)
    path = tmp_path / "normalised.pt"
    torch.save({"state_dict": state}, path)
    model = load_model(path, arch="wideresnet", kwargs={"depth": 10, "widen_factor": 1}, num_classes=10,
                       in_channels=3, checkpoint_format="robustbench")
    assert isinstance(model, Normalized)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = robustbench_wrn((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        assert torch.allclose(model.eval()(x), expected, atol=1e-5)


def test_robustbench_with_the_wrong_architecture_is_refused(tmp_path, robustbench_wrn):
    path = tmp_path / "rb.pt"
    torch.save(_with_prefix(robustbench_wrn.state_dict(), "module."), path)
    with pytest.raises(CheckpointError, match="widen_factor"):
        load_model(path, arch="wideresnet", kwargs={"depth": 10, "widen_factor": 2}, num_classes=10,
                   in_channels=3, checkpoint_format="robustbench")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path, arch="wideresnet", kwargs={"depth": 10, "widen_factor": 1}, num_classes=100,
                   in_channels=3, checkpoint_format="robustbench")
    with pytest.raises(CheckpointError, match="needs the architecture"):
        load_model(path, checkpoint_format="robustbench")


def test_teacher_config_loads_a_robustbench_checkpoint(tmp_path, robustbench_wrn):
    """``teacher.format: robustbench`` through the config and ``load_teacher`` gives a frozen teacher."""
    from crdnd_ray.config import load_config
    from crdnd_ray.engine.teachers import load_teacher, prepare_teacher

    path = tmp_path / "rb.pt"
    torch.save({"state_dict": _with_prefix(robustbench_wrn.state_dict(), "module.")}, path)
    cfg = load_config(None, ["data.name=cifar10", "teacher.arch=wideresnet",
                             "teacher.kwargs={depth: 10, widen_factor: 1}", "teacher.format=robustbench",
                             f"teacher.checkpoint={path}", "tracking.enabled=false"])
    assert prepare_teacher(cfg, cache_root=tmp_path / "cache") == path
    assert not (tmp_path / "cache").exists(), "a configured checkpoint is never trained or cached"
    teacher = load_teacher(cfg, path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    shape = (2, 3, 32, 32)
    assert torch.allclose(_outputs(teacher, shape), _outputs(robustbench_wrn, shape), atol=1e-6)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        prepare_teacher(cfg.with_overrides({"teacher.checkpoint": str(broken)}), cache_root=tmp_path / "cache")
