"""The one YAML schema that every command reads, as pydantic models.

A run config, a sweep file and an ablation file share this schema: the ``search`` and ``ablation``
sections are optional, so a sweep or ablation file is also a valid run config whose fixed values are
the run's.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from crdnd_ray.config.overrides import apply_overrides
from crdnd_ray.config.validation import validate_model

__all__ = [
    "AblationConfig",
    "AblationTuning",
    "AttackConfig",
    "CompensationConfig",
    "ContrastiveConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "IadConfig",
    "MethodConfig",
    "ModelConfig",
    "ParameterSpec",
    "RunConfig",
    "SamplerConfig",
    "ScalingConfig",
    "SchedulerConfig",
    "SearchConfig",
    "TeacherConfig",
    "TeacherTrainingConfig",
    "TrackingConfig",
    "TradesConfig",
    "TrainConfig",
    "check_batch_split",
]


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
    """How ``crdnd-ray teacher`` trains a robust teacher when no checkpoint is given.

    A TRADES teacher uses ``method.trades.beta``, the one TRADES β of the config. ``weight_decay`` left unset
    takes ``train.weight_decay``; set it to keep the teacher (and its cache entry) fixed while the student's
    weight decay is tuned.
    """

    method: Literal["sat", "trades"] = "sat"
    epochs: int = Field(default=20, ge=1)
    lr: PositiveNumber = 0.05
    weight_decay: NonNegativeNumber | None = None


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
    """TRADES (a student method, or the teacher's training when ``teacher.training.method: trades``)."""

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
    """Per-epoch (PGD on a subset) and final (attack suite) evaluation, and verification.

    With ``verify``, a sweep verifies its ``verify_top`` best trials by the searched metric (and every trial of
    a multi-objective Pareto front) with AutoAttack and the gradient-masking checks, and picks ``best.yaml``
    by the verified AutoAttack accuracy: the searched PGD number favours exactly the trials whose robustness
    is overstated. An ablation verifies each variant's best seed (``verify_seeds: all``: every seed).
    """

    eps: PositiveNumber = 0.2
    epoch_attacks: list[str] = Field(default_factory=lambda: ["clean", "pgd20"])
    epoch_limit: int = Field(default=256, ge=1)
    final_attacks: list[str] = Field(default_factory=lambda: ["clean", "fgsm", "pgd20", "cw"])
    autoattack: bool = False
    final_limit: int | None = Field(default=None, ge=1)
    verify: bool = False
    verify_top: int = Field(default=3, ge=1)
    verify_seeds: Literal["best", "all"] = "best"

    @property
    def selection_metric(self) -> str:
        """The per-epoch metric that picks the best checkpoint: the last epoch attack's accuracy."""
        return f"epoch_{self.epoch_attacks[-1]}_acc"

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
    """Optuna's sampler. ``tpe`` and ``gp`` propose at random for their first ``startup_trials`` trials
    (unset: Optuna's default of 10, which makes a search of 10 trials or fewer a random search)."""

    kind: Literal["tpe", "gp", "random", "nsga2"] = "tpe"
    seed: int = 0
    startup_trials: int | None = Field(default=None, ge=1)


class SchedulerConfig(_Section):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    max_t: int | None = Field(default=None, ge=1)
    reduction_factor: Number = Field(default=2.0, gt=1)


class SearchConfig(_Section):
    """The Ray Tune + Optuna search (``crdnd-ray sweep``)."""

    metric: str | list[str] = "epoch_pgd20_acc"
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
        return self


class AblationTuning(SearchConfig):
    """Equal-budget tuning of every ablation variant (``ablation.tune``) before its seeds run.

    Each variant gets its own Optuna search of ``num_samples`` trials (same sampler, scheduler and metric)
    over ``space`` plus its entries of ``variant_space`` (an entry there replaces a shared one of the same
    key). A key that the variant's own overrides set is pinned: it keeps that value and is not tuned. A
    ``when`` condition may name a fixed config key (``method.name``, ``method.contrastive.kind``): the
    variant's value decides whether the parameter is tuned for it. Tuning trials train with ``seed``, which
    must not be one of ``ablation.seeds``: the seeds compared in the table must not be the ones that chose
    the settings. Tuning has one objective, a metric reported every epoch, so ``overrides`` (dotted keys, for
    the tuning trials only; a variant's own overrides win) can make their final evaluation cheap.
    """

    variant_space: dict[str, dict[str, ParameterSpec]] = Field(default_factory=dict)
    seed: int = 1000
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_tuning(self) -> AblationTuning:
        if len(self.metrics) > 1:
            raise ValueError("tuning picks one best setting per variant, so it needs a single 'metric'")
        if not self.space and not any(self.variant_space.values()):
            raise ValueError("there is nothing to tune: give 'space' (shared) or 'variant_space' entries, "
                             "e.g. space: {train.lr: {type: loguniform, low: 0.1, high: 10}}")
        return self


class AblationConfig(_Section):
    """Component switches × seeds (``crdnd-ray ablate``), optionally each variant tuned first (``tune``)."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    baseline: str | None = None
    metrics: list[str] = Field(default_factory=lambda: ["best_clean_acc", "best_pgd20_acc", "best_cw_acc"])
    from_sweep: str | None = None
    max_concurrent: int = Field(default=2, ge=1)
    tune: AblationTuning | None = None

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
        if self.tune is not None:
            unknown = [name for name in self.tune.variant_space if name not in self.variants]
            if unknown:
                raise ValueError(f"tune.variant_space names {', '.join(unknown)}, which is not among the variants "
                                 f"({', '.join(self.variants)})")
            if self.tune.seed in self.seeds:
                raise ValueError(f"tune.seed {self.tune.seed} is also one of the seeds {self.seeds}; the tuning seed "
                                 "chose the settings, so a run with it would not be a fresh measurement. Pick a "
                                 "tune.seed outside the seeds")
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
        check_batch_split(self.data.batch_size, self.scaling.num_workers)
        return self

    def run_dict(self) -> dict[str, Any]:
        """The config without the sweep and ablation sections: what one training run uses."""
        return self.model_dump(mode="json", exclude={"search", "ablation"})

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> RunConfig:
        """A new validated config with dotted-key ``overrides`` applied (raises ConfigError)."""
        raw = self.model_dump(mode="json", exclude_none=False)
        apply_overrides(raw, overrides, source=source)
        return validate_model(RunConfig, raw, source=source)


def check_batch_split(batch_size: int, workers: int) -> None:
    """Refuse a global batch that does not split evenly over ``workers`` (ValueError with the fix)."""
    if batch_size % workers:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch and must split evenly over "
            f"{workers} workers (scaling.num_workers); choose a multiple of {workers}"
        )


