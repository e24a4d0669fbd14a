"""Model checkpoints: crdnd-ray's own self-describing files and RobustBench state dicts.

Every file is read with ``torch.load(weights_only=True)``, so a checkpoint can never run code.
"""

from __future__ import annotations

import inspect
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crdnd_ray.models import MODELS, build_model
from crdnd_ray.models.normalize import Normalized

__all__ = ["CheckpointError", "load_model", "load_state_dict_file", "read_checkpoint", "save_model"]

FORMAT = "crdnd-ray/1"


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or does not fit the model; the message says which and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_model(path: str | Path, model: nn.Module, arch: str, kwargs: dict[str, Any], num_classes: int,
               in_channels: int, extra: dict[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint (architecture, shape facts, weights) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "arch": arch,
        "kwargs": dict(kwargs),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "state_dict": unwrap(model).state_dict(),
        **(extra or {}),
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def _name(path: str | Path | bytes) -> str:
    """How messages name a checkpoint: its path, or where its bytes came from."""
    return "<checkpoint bytes received through Ray or from rank 0>" if isinstance(path, bytes) else str(path)


def _unreadable(path: str, error: BaseException | str) -> str:
    problem = error if isinstance(error, str) else f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return (f"The checkpoint '{path}' could not be read ({problem}). "
            "The file is corrupt, truncated, or not a PyTorch weights file; re-create or re-download it.")


def read_checkpoint(path: str | Path | bytes) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), with clear errors: a file, or a file's bytes (as
    they reach Ray workers through the object store or a process group)."""
    source: Any = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    path = _name(path)
    if isinstance(source, Path) and not source.is_file():
        raise CheckpointError(f"The checkpoint '{path}' does not exist. Check the path (train one with "
                              "'crdnd-ray teacher' or 'crdnd-ray train').")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if code is None:
            raise CheckpointError(_unreadable(path, "the file is not a PyTorch weights file")) from None
        raise CheckpointError(
            f"The checkpoint '{path}' holds Python objects that loading it would have to run ({code.group(1)}; "
            "UnpicklingError), "
            "so it was refused: crdnd-ray only loads plain tensors and containers, never code from a file. "
            "Save the model's weights as a state dict (crdnd-ray train and teacher do) and load that file."
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(_unreadable(path, error)) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"The checkpoint '{path}' holds a {type(payload).__name__}, not a state dict.")
    return payload


def load_state_dict_file(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, turning mismatches into a CheckpointError."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        summary = " ".join(str(error).split())[:600]
        raise CheckpointError(
            f"The weights in '{source}' do not fit the configured model ({summary}). Check the architecture "
            "settings (arch and kwargs such as depth and widen_factor) and the number of classes."
        ) from None


def _robustbench_state_dict(payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple | None]:
    """Map a RobustBench checkpoint to our WideResNet's keys.

    RobustBench files hold either the state dict or ``{"state_dict": ...}``; keys may carry a
    ``module.`` (DataParallel) or ``model.`` prefix; ``sub_block1.*`` weights exist in some WRN-34-10s but
    are unused in the forward pass and are dropped; ``mu``/``sigma`` tensors (input normalisation) are
    returned separately.
    """
    state = payload.get("state_dict", payload)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        if not key.startswith("sub_block1."):
            mapped[key] = value
    mean, std = mapped.pop("mu", None), mapped.pop("sigma", None)
    normalisation = (mean.flatten().tolist(), std.flatten().tolist()) if mean is not None and std is not None else None
    return mapped, normalisation


def _effective_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture arguments a model is built with: the constructor's defaults updated by ``kwargs``."""
    parameters = inspect.signature(MODELS[arch].__init__).parameters.values() if arch in MODELS else []
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
                and p.name not in ("num_classes", "in_channels")}
    return {**defaults, **kwargs}


def load_model(path: str | Path | bytes, *, arch: str | None = None, kwargs: dict[str, Any] | None = None,
               num_classes: int | None = None, in_channels: int | None = None, checkpoint_format: str = "crdnd",
               mean: list[float] | None = None, std: list[float] | None = None) -> nn.Module:
    """Build a model and load its weights from ``path`` (a file, or its bytes).

    A crdnd-ray checkpoint describes its own architecture; the arguments, when given, must agree with it.
    A RobustBench state dict needs ``arch``/``kwargs``/``num_classes`` from the config. ``mean``/``std``
    wrap the model in an input normalisation.
    """
    payload = read_checkpoint(path)
    path = _name(path)
    if checkpoint_format == "robustbench":
        state_dict, normalisation = _robustbench_state_dict(payload)
        if normalisation and mean is None:
            mean, std = normalisation
    else:
        if payload.get("format") != FORMAT:
            raise CheckpointError(
                f"'{path}' is not a crdnd-ray checkpoint (no '{FORMAT}' marker). For a RobustBench state dict "
                "set teacher.format: robustbench and give teacher.arch/kwargs."
            )
        for name, wanted in (("arch", arch), ("num_classes", num_classes), ("in_channels", in_channels)):
            if wanted is not None and payload[name] != wanted:
                raise CheckpointError(
                    f"The checkpoint '{path}' was saved for {name}={payload[name]!r}, but the config asks for "
                    f"{wanted!r}. Use a checkpoint that matches the dataset and model, or fix the config."
                )
        saved = _effective_kwargs(payload["arch"], payload["kwargs"])
        if kwargs is not None and _effective_kwargs(payload["arch"], kwargs) != saved:
            raise CheckpointError(
                f"The checkpoint '{path}' was saved for a {payload['arch']} with {saved}, but the config asks for "
                f"{_effective_kwargs(payload['arch'], kwargs)}. Set the config's kwargs to the checkpoint's (for a "
                f"teacher: teacher.kwargs: {payload['kwargs']}), or use a checkpoint of the configured model."
            )
        arch, kwargs = payload["arch"], payload["kwargs"]
        num_classes, in_channels = payload["num_classes"], payload["in_channels"]
        state_dict = payload["state_dict"]
    if arch is None or num_classes is None:
        raise CheckpointError(f"Loading '{path}' needs the architecture and class count from the config.")
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels or 3, **(kwargs or {}))
    load_state_dict_file(model, state_dict, str(path))
    if mean is not None and std is not None:
        model = Normalized(model, mean, std)
    return model
