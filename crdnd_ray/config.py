"""The one YAML schema that every command reads, as pydantic models, with loading and clear errors.

A run config, a sweep file and an ablation file share this schema: the ``search`` and ``ablation``
sections are optional, so a sweep or ablation file is also a valid run config whose fixed values are
the run's. ``--set dotted.key=value`` overrides are applied to the raw YAML before validation, so they
are checked exactly like values written in the file.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

__all__ = [
    "AblationConfig",
    "AttackConfig",
    "CompensationConfig",
    "ConfigError",
    "ContrastiveConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "SearchConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "flatten",
    "load_config",
    "parse_override",
]


class ConfigError(Exception):
    """A configuration problem, with a one-paragraph message meant for the user (no traceback)."""


_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _parse_fraction(value: Any) -> Any:
    """Accept ``8/255``-style strings for float fields."""
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            denominator = float(match.group(2))
            if denominator == 0:
                raise ValueError(f"'{value}' divides by zero")
            return float(match.group(1)) / denominator
    return value


Number = Annotated[float, BeforeValidator(_parse_fraction)]
PositiveNumber = Annotated[float, BeforeValidator(_parse_fraction), Field(gt=0)]
NonNegativeNumber = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0)]
UnitInterval = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentConfig(_Section):
    """Names the experiment (MLflow experiment, default output folder) and fixes randomness."""

    name: str = Field(default="crdnd-digits", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    deterministic: bool = False


class DataConfig(_Section):
    """Which dataset, where it lives, and how it is batched.

    ``batch_size`` is the global batch: with N workers each takes ``batch_size / N``. ``synthetic`` is
    CIFAR-100-shaped random tensors for throughput benchmarks only (see ``crdnd_ray.data``).
    """

    name: Literal["digits", "cifar10", "cifar100", "synthetic"] = "digits"
    root: str = "data"
    download: bool = False
    image_size: int | None = Field(default=None, ge=4)
    augment: bool = True
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)
    loader_workers: int = Field(default=0, ge=0)
    train_limit: int | None = Field(default=None, ge=1)
    test_limit: int | None = Field(default=None, ge=1)


def _check_arch(arch: str) -> str:
    """Refuse an architecture that is not in the model registry (imported lazily: it needs torch)."""
    from crdnd_ray.models import MODELS

    if arch not in MODELS:
        close = difflib.get_close_matches(arch, list(MODELS), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"'{arch}' is not a known architecture; {hint}the known ones are {', '.join(sorted(MODELS))}")
    return arch


def _check_arch_kwargs(kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """Refuse ``kwargs`` entries that the configured architecture's constructor does not take."""
    from crdnd_ray.models import MODELS

    model_class = MODELS.get(info.data.get("arch", ""))
    if model_class is None:
        return kwargs
    parameters = inspect.signature(model_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    accepted = [name for name in parameters if name not in ("self", "num_classes", "in_channels")]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
            raise ValueError(f"architecture '{info.data['arch']}' has no argument '{key}'; {hint}{takes}")
    return kwargs


class ModelConfig(_Section):
    """A network from the model registry and its architecture arguments."""

    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _arch = field_validator("arch")(_check_arch)
    _kwargs = field_validator("kwargs")(_check_arch_kwargs)


class TeacherTrainingConfig(_Section):
    """How ``crdnd-ray teacher`` trains a robust teacher when no checkpoint is given."""

    method: Literal["sat", "trades"] = "sat"
    epochs: int = Field(default=20, ge=1)
    lr: PositiveNumber = 0.05
    trades_beta: PositiveNumber = 6.0


class TeacherConfig(_Section):
    """The frozen robust teacher: an architecture plus a checkpoint, or training settings.

    ``format: robustbench`` loads a RobustBench state dict (``module.`` prefixes stripped, unused
    ``sub_block1`` weights dropped, ``mu``/``sigma`` normalisation honoured). ``mean``/``std`` wrap the
    teacher in an input normalisation for checkpoints trained on normalised inputs.
    """

    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    format: Literal["crdnd", "robustbench"] = "crdnd"
    mean: list[float] | None = None
    std: list[float] | None = None
    training: TeacherTrainingConfig = Field(default_factory=TeacherTrainingConfig)

    _arch = field_validator("arch")(_check_arch)
    _kwargs = field_validator("kwargs")(_check_arch_kwargs)


class CompensationConfig(_Section):
    """Adaptive compensation of an unreliable teacher (DESIGN.md section 1)."""

    kind: Literal["none", "confidence", "transition"] = "confidence"
    beta: NonNegativeNumber = 1.0
    on_adversarial: bool = True
    fallback: Literal["onehot", "student"] = "onehot"
    penalty: NonNegativeNumber = 0.01
    lr: PositiveNumber | None = None


class ContrastiveConfig(_Section):
    """Contrastive relationship loss among examples of the (global) batch."""

    kind: Literal["none", "infonce", "relation"] = "infonce"
    weight: NonNegativeNumber = 0.5
    temperature: PositiveNumber = 0.1
    dim: int = Field(default=128, ge=2)
    symmetric: bool = True
    denoise: bool = True


class TradesConfig(_Section):
    beta: PositiveNumber = 6.0


class IadConfig(_Section):
    beta: NonNegativeNumber = 0.1
    begin: int = Field(default=0, ge=0)


class MethodConfig(_Section):
    """The distillation method and its settings.

    ``temperature`` and ``alpha`` left unset take the method's published default (RSLAD and CRDND τ=1,
    α=5/6; ARD and IAD τ=30, α=1; AdaAD α=1).
    """

    name: str = "crdnd"
    temperature: PositiveNumber | None = None
    alpha: UnitInterval | None = None
    compensation: CompensationConfig = Field(default_factory=CompensationConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    trades: TradesConfig = Field(default_factory=TradesConfig)
    iad: IadConfig = Field(default_factory=IadConfig)


class AttackConfig(_Section):
    """The inner (training) attack. ``start`` and ``bn_mode`` left unset take the method's default."""

    eps: PositiveNumber = 0.2
    step_size: PositiveNumber = 0.05
    steps: int = Field(default=10, ge=1)
    start: Literal["uniform", "gaussian", "none"] | None = None
    bn_mode: Literal["eval", "train"] | None = None


class TrainConfig(_Section):
    """Optimiser, schedule, checkpoints and speed switches of the epoch loop.

    ``cuda_graphs`` replays each method's inner attack (teacher forward and PGD steps) as a CUDA graph:
    ``auto`` and ``true`` on CUDA devices (elsewhere the attack runs eagerly and the log says why).
    """

    epochs: int = Field(default=15, ge=1)
    lr: PositiveNumber = 0.05
    momentum: UnitInterval = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeNumber = 2e-4
    schedule: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[Number] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: PositiveNumber = 0.1
    warmup_epochs: int = Field(default=0, ge=0)
    bf16: bool = False
    channels_last: bool = False
    cuda_graphs: Literal["auto"] | bool = "auto"
    pin_memory: bool = False
    max_steps_per_epoch: int | None = Field(default=None, ge=1)


class EvalConfig(_Section):
    """Per-epoch (PGD on a subset) and final (attack suite) evaluation."""

    eps: PositiveNumber = 0.2
    epoch_attacks: list[str] = Field(default_factory=lambda: ["clean", "pgd20"])
    epoch_limit: int = Field(default=256, ge=1)
    final_attacks: list[str] = Field(default_factory=lambda: ["clean", "fgsm", "pgd20", "cw"])
    autoattack: bool = False
    final_limit: int | None = Field(default=None, ge=1)

    @property
    def selection_metric(self) -> str:
        """The per-epoch metric that picks the best checkpoint: the last epoch attack's accuracy."""
        return f"{self.epoch_attacks[-1]}_acc"

    @property
    def final_attack_names(self) -> list[str]:
        return self.final_attacks + (["autoattack"] if self.autoattack and "autoattack" not in self.final_attacks else [])


class ScalingConfig(_Section):
    """Ray Train workers. Unset resources are sized from the cluster.

    ``torch_threads`` sets PyTorch's intra-op threads per process on CPU (unset: PyTorch's default).
    Tiny models such as the digits CNN run fastest with 1, especially when several processes share cores.
    ``trials_per_gpu`` packs single-worker GPU trials, each taking 1/k of a GPU (``auto``: as many as the
    concurrent trials need, at most 4); trials of several workers always take whole GPUs.
    """

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | None = None
    resources_per_worker: dict[str, float] | None = None
    address: str | None = None
    sync_batchnorm: bool = False
    max_failures: int = Field(default=0, ge=0)
    in_process_single_worker: bool = True
    torch_threads: int | None = Field(default=None, ge=1)
    trials_per_gpu: Annotated[int, Field(ge=1)] | Literal["auto"] = 1


class TrackingConfig(_Section):
    """Where MLflow records runs."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = None


class ParameterSpec(_Section):
    """One dimension of a search space."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Number | None = None
    high: Number | None = None
    values: list[Any] | None = None
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> ParameterSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' parameter needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a '{self.type}' parameter needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"the range is empty: low={self.low} is not below high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform range needs positive bounds, but low={self.low}")
        return self


class SamplerConfig(_Section):
    kind: Literal["tpe", "gp", "random", "nsga2"] = "tpe"
    seed: int = 0


class SchedulerConfig(_Section):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    max_t: int | None = Field(default=None, ge=1)
    reduction_factor: Number = Field(default=2.0, gt=1)


class SearchConfig(_Section):
    """The Ray Tune + Optuna search (``crdnd-ray sweep``)."""

    metric: str | list[str] = "pgd20_acc"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    space: dict[str, ParameterSpec] = Field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        if isinstance(self.mode, str):
            return [self.mode] * len(self.metrics)
        return list(self.mode)

    @model_validator(mode="after")
    def _check_objectives(self) -> SearchConfig:
        if len(self.modes) != len(self.metrics):
            raise ValueError(
                f"'mode' has {len(self.modes)} entries but 'metric' has {len(self.metrics)}; give one mode per metric"
            )
        if len(self.metrics) > 1 and self.scheduler.kind == "asha":
            raise ValueError(
                "ASHA stops trials on a single metric and cannot be combined with a multi-objective search; "
                "set search.scheduler.kind: none"
            )
        if len(self.metrics) > 1 and self.sampler.kind in ("gp",):
            raise ValueError("the 'gp' sampler is single-objective; use 'nsga2', 'tpe' or 'random'")
        for name, spec in self.space.items():
            for other in (spec.when or {}):
                if other not in self.space:
                    raise ValueError(
                        f"parameter '{name}' has a condition on '{other}', which is not a parameter of the space"
                    )
        return self


class AblationConfig(_Section):
    """Component switches × seeds (``crdnd-ray ablate``)."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    baseline: str | None = None
    metrics: list[str] = Field(default_factory=lambda: ["clean_acc", "pgd20_acc", "cw_acc"])
    from_sweep: str | None = None
    max_concurrent: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        if not self.seeds:
            raise ValueError("'seeds' is empty; list at least one seed, e.g. seeds: [0, 1, 2]")
        if not self.variants:
            raise ValueError("'variants' is empty; name at least one variant, e.g. variants: {full: {}}")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(
                f"baseline '{self.baseline}' is not among the variants ({', '.join(self.variants)})"
            )
        return self


class RunConfig(_Section):
    """The whole configuration of a run, a sweep or an ablation."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig | None = None
    ablation: AblationConfig | None = None

    @model_validator(mode="after")
    def _check_batch_split(self) -> RunConfig:
        if self.data.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is the global batch and must split evenly over "
                f"scaling.num_workers={self.scaling.num_workers}; choose a multiple of {self.scaling.num_workers}"
            )
        return self

    def run_dict(self) -> dict[str, Any]:
        """The config without the sweep and ablation sections: what one training run uses."""
        return self.model_dump(mode="json", exclude={"search", "ablation"})

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> RunConfig:
        """A new validated config with dotted-key ``overrides`` applied (raises ConfigError)."""
        raw = self.model_dump(mode="json", exclude_none=False)
        apply_overrides(raw, overrides, source=source)
        return validate_config(raw, source=source)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_hash(tree: Any) -> str:
    """A short stable hash of any JSON-serialisable value (used to cache teachers)."""
    payload = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``8/255``, lists and booleans work)."""
    if "=" not in text:
        raise ConfigError(
            f"The override '--set {text}' has no '='. Write it as --set dotted.key=value, "
            "for example --set train.epochs=5."
        )
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"The override '--set {text}' has an empty key. Write it as --set dotted.key=value.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str = "overrides") -> None:
    """Set each dotted key of ``overrides`` in the nested ``raw`` dict, creating sections as needed.

    Inside free-form mappings (``student.kwargs``, ``search.space``, ...) the rest of the key is one
    entry, so ``--set search.space.method.temperature={type: uniform, low: 1, high: 4}`` works; inside
    ``ablation.variants.NAME`` the rest is one dotted override of that variant.
    """
    for dotted, value in overrides.items():
        parts = _split_key(dotted)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(
                    f"Cannot set '{dotted}' from {source}: '{'.'.join(parts[: depth + 1])}' is a value, "
                    "not a section. Set the section's keys one by one instead."
                )
            node = node[part]
        node[parts[-1]] = value


_FREE_FORM_SECTIONS = ("student.kwargs", "teacher.kwargs", "scaling.resources_per_worker", "search.space")


def _split_key(dotted: str) -> list[str]:
    for prefix in _FREE_FORM_SECTIONS:
        if dotted.startswith(prefix + "."):
            return prefix.split(".") + [dotted[len(prefix) + 1 :]]
    if dotted.startswith("ablation.variants."):
        name, _, rest = dotted[len("ablation.variants.") :].partition(".")
        return ["ablation", "variants", name] + ([rest] if rest else [])
    return dotted.split(".")


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for position, item in enumerate(node.value):
                lines[path + (str(position),)] = item.start_mark.line + 1
                walk(item, path + (str(position),))

    if root is not None:
        walk(root, ())
    return lines


def _suggest(key: str, location: tuple[Any, ...]) -> str:
    model: Any = RunConfig
    for part in location[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        model = next(
            (arg for arg in (getattr(annotation, "__args__", None) or (annotation,)) if hasattr(arg, "model_fields")),
            None,
        )
        if model is None:
            return ""
    fields = getattr(model, "model_fields", {})
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys here are: {', '.join(fields)}." if fields else ""


def _override_source(location: tuple[str, ...], overridden: dict[tuple[str, ...], str]) -> str | None:
    """The ``--set`` override that set the value at ``location`` (or a section above or below it)."""
    for path, text in overridden.items():
        cut = min(len(path), len(location))
        if cut and path[:cut] == location[:cut]:
            return text
    return None


def _describe_errors(error: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                     overridden: dict[tuple[str, ...], str] | None = None) -> str:
    problems = []
    for item in error.errors():
        location = tuple(str(part) for part in item["loc"] if not str(part).startswith("function-after"))
        location = tuple(part for part in location if part not in ("str", "list[str]", "float", "int"))
        dotted = ".".join(location) or "(top level)"
        override = _override_source(location, overridden or {})
        line = None
        for cut in range(len(location), 0, -1):
            line = lines.get(location[:cut])
            if line:
                break
        if override is not None:
            where = f"--set {override} (on top of {source})"
        else:
            where = f"{source}, line {line}" if line else source
        if item["type"] == "extra_forbidden":
            hint = _suggest(location[-1], location)
            problems.append(f"{where}: unknown key '{dotted}'.{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            problems.append(f"{where}: '{dotted}' is invalid: {message}{shown}.")
    return " ".join(problems) + " Fix the value in the file or with --set and run the command again."


def validate_config(raw: dict[str, Any], source: str = "config", text: str = "",
                    overridden: dict[tuple[str, ...], str] | None = None) -> RunConfig:
    """Validate a raw mapping into a RunConfig, turning every problem into a ConfigError.

    ``overridden`` maps the key paths set by ``--set`` to the override's text, so a bad override is
    reported as that ``--set`` rather than as a line of the file.
    """
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, source, _yaml_lines(text), overridden)) from None


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML config file (or the defaults when ``path`` is None), with overrides.

    Raises ConfigError with a message that names the file, the key path and the line.
    """
    text = ""
    source = "the built-in defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(
                f"The config file '{file}' does not exist. Check the path; the shipped examples live in "
                "search_spaces/ and ablations/."
            )
        text = file.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(
                f"{file}{line}: this is not valid YAML ({problem}). Fix the syntax (indentation, colons, "
                "quotes) and run the command again."
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{file}: the top level must be a mapping of sections (experiment, data, method, ...), "
                f"not a {type(loaded).__name__}."
            )
        raw = loaded
    overridden: dict[tuple[str, ...], str] = {}
    if overrides:
        if isinstance(overrides, list):
            pairs = {}
            for item in overrides:
                key, value = parse_override(item)
                pairs[key] = value
                overridden[tuple(_split_key(key))] = item.strip()
        else:
            pairs = dict(overrides)
            overridden = {tuple(_split_key(key)): f"{key}={value!r}" for key, value in pairs.items()}
        apply_overrides(raw, pairs, source=f"--set in {source}")
    return validate_config(raw, source=source, text=text, overridden=overridden)
