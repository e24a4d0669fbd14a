"""Config loading: the schema, ``--set`` overrides, fractions, and one-paragraph errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from crdnd_ray.cli import app
from crdnd_ray.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "search_spaces" / "digits.yaml"
SAFE = ["--set", "tracking.enabled=false"]
"""Options every CLI call here adds, so that nothing is recorded even if a case were accepted."""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run_cli(args: list[str], tmp_path: Path):
    """Run ``crdnd-ray teacher ...`` in-process with the output in ``tmp_path``."""
    result = CliRunner().invoke(app, ["teacher", *args, "--output", str(tmp_path / "out"), *SAFE])
    return result


def _assert_user_error(result, *needles: str) -> str:
    """Exit code 2, one paragraph on stderr that contains every needle, and no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert "\n" not in message, f"not one paragraph: {message!r}"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- bad input through the CLI ---------------------------------------------------------------------


def test_unknown_key_names_file_key_line_and_suggests(tmp_path):
    config = _write(tmp_path, "experiment:\n  name: x\ntrain:\n  lr: 0.1\n  epochz: 3\n")
    message = _assert_user_error(_run_cli([str(config)], tmp_path), str(config), "train.epochz", "line 5")
    assert "Did you mean 'epochs'?" in message


def test_unknown_section_suggests(tmp_path):
    config = _write(tmp_path, "trian:\n  epochs: 3\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), "'trian'", "line 1", "Did you mean 'train'?")


def test_wrong_type_names_key_and_line(tmp_path):
    config = _write(tmp_path, "data:\n  name: digits\ntrain:\n  epochs: many\n")
    message = _assert_user_error(_run_cli([str(config)], tmp_path), str(config), "train.epochs", "line 4")
    assert "'many'" in message


def test_out_of_range_value_names_key_and_line(tmp_path):
    config = _write(tmp_path, "attack: {eps: 0.1, steps: 0}\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), "attack.steps", "line 1", "greater than or equal to 1")


def test_bad_choice_names_key(tmp_path):
    config = _write(tmp_path, "method:\n  compensation:\n    kind: magic\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), "method.compensation.kind", "line 3", "'magic'")


def test_several_problems_are_all_reported_in_one_paragraph(tmp_path):
    config = _write(tmp_path, "data:\n  batch_sise: 3\ntrain:\n  epochs: abc\n  lr: -1\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), "data.batch_sise", "line 2", "train.epochs", "line 4",
                       "train.lr", "line 5")


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    _assert_user_error(_run_cli([str(missing)], tmp_path), str(missing), "does not exist")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    config = _write(tmp_path, "data:\n  name: digits\ntrain: {epochs: 3\nmethod:\n  name: crdnd\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), str(config), "not valid YAML", "line ")


def test_top_level_must_be_a_mapping(tmp_path):
    config = _write(tmp_path, "- train\n- data\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), str(config), "top level must be a mapping")


def test_set_without_equals(tmp_path):
    _assert_user_error(_run_cli([str(DIGITS), "--set", "train.epochs"], tmp_path), "--set train.epochs", "'='")


def test_set_with_empty_key(tmp_path):
    _assert_user_error(_run_cli([str(DIGITS), "--set", "=3"], tmp_path), "empty key")


def test_bad_set_values_are_validated_like_file_values_and_blame_the_override(tmp_path):
    message = _assert_user_error(_run_cli([str(DIGITS), "--set", "train.epochs=abc"], tmp_path),
                                 "--set train.epochs=abc", "train.epochs", "'abc'")
    assert "line" not in message.split("train.epochs")[0], "a --set problem must not point at a file line"
    _assert_user_error(_run_cli([str(DIGITS), "--set", "eval.eps=-0.1"], tmp_path), "--set eval.eps=-0.1",
                       "eval.eps", "greater than 0")
    _assert_user_error(_run_cli([str(DIGITS), "--set", "method.contrastive.kind=cosine"], tmp_path),
                       "method.contrastive.kind", "'cosine'")
    _assert_user_error(_run_cli([str(DIGITS), "--set", "train.epoch=3"], tmp_path), "train.epoch",
                       "Did you mean 'epochs'?")


def test_set_into_a_value_is_an_error(tmp_path):
    _assert_user_error(_run_cli([str(DIGITS), "--set", "train.epochs.first=3"], tmp_path), "train.epochs",
                       "not a section")


def test_unknown_architecture_and_argument_are_config_errors(tmp_path):
    _assert_user_error(_run_cli([str(DIGITS), "--set", "teacher.arch=resnet19"], tmp_path), "teacher.arch",
                       "did you mean 'resnet18'?")
    _assert_user_error(_run_cli([str(DIGITS), "--set", "student.kwargs.widht=8"], tmp_path), "student.kwargs",
                       "'widht'", "did you mean 'width'?")


def test_fraction_dividing_by_zero(tmp_path):
    config = _write(tmp_path, "eval:\n  eps: 8/0\n")
    _assert_user_error(_run_cli([str(config)], tmp_path), "eval.eps", "line 2", "divides by zero")


# --- values --------------------------------------------------------------------------------------------


def test_fractions_parse(tmp_path):
    config = _write(tmp_path, "eval:\n  eps: 8/255\nattack:\n  eps: 8/255\n  step_size: 2 / 255\n")
    cfg = load_config(config)
    assert cfg.eval.eps == pytest.approx(8 / 255)
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.step_size == pytest.approx(2 / 255)
    assert load_config(None, ["eval.eps=16/255"]).eval.eps == pytest.approx(16 / 255)
    assert load_config(None, ["train.milestones=[1/2, 3/4]"]).train.milestones == [0.5, 0.75]


def test_parse_override_reads_yaml_values():
    assert parse_override("train.epochs=5") == ("train.epochs", 5)
    assert parse_override("eval.final_attacks=[clean, pgd20]") == ("eval.final_attacks", ["clean", "pgd20"])
    assert parse_override("data.download=true") == ("data.download", True)
    assert parse_override("experiment.name=a=b") == ("experiment.name", "a=b")
    assert parse_override("teacher.checkpoint=") == ("teacher.checkpoint", None)
    with pytest.raises(ConfigError, match="no '='"):
        parse_override("train.epochs")


def test_nested_overrides_apply_on_top_of_the_file():
    cfg = load_config(DIGITS, ["method.compensation.beta=2.5", "search.sampler.seed=7", "eval.eps=8/255",
                               "teacher.training.epochs=3", "student.kwargs.width=8", "method.temperature=4"])
    assert cfg.method.compensation.beta == 2.5
    assert cfg.method.compensation.kind == "none", "siblings of an overridden key are kept"
    assert cfg.search is not None and cfg.search.sampler.seed == 7 and cfg.search.sampler.kind == "tpe"
    assert cfg.eval.eps == pytest.approx(8 / 255)
    assert cfg.teacher.training.epochs == 3 and cfg.teacher.training.lr == 0.05
    assert cfg.student.kwargs == {"width": 8}
    assert cfg.method.temperature == 4.0
    with pytest.raises(ConfigError, match=r"method\.compensation\.beta"):
        load_config(DIGITS, ["method.compensation.beta=-1"])


def test_dict_overrides_and_with_overrides_validate():
    cfg = load_config(DIGITS, {"train.epochs": 2, "tracking.enabled": False})
    assert cfg.train.epochs == 2 and cfg.tracking.enabled is False
    changed = cfg.with_overrides({"attack.steps": 3, "method.contrastive.kind": "relation"})
    assert changed.attack.steps == 3 and changed.method.contrastive.kind == "relation"
    assert cfg.attack.steps == 5, "with_overrides returns a new config"
    with pytest.raises(ConfigError, match=r"attack\.steps"):
        cfg.with_overrides({"attack.steps": 0})


def test_sweep_file_is_a_valid_run_config():
    cfg = load_config(DIGITS)
    assert isinstance(cfg, RunConfig)
    assert cfg.search is not None and cfg.search.space["train.lr"].type == "loguniform"
    assert cfg.data.name == "digits" and cfg.train.epochs == 8 and cfg.eval.eps == 0.2
    assert cfg.student.kwargs == {"width": 16} and cfg.teacher.training.epochs == 15
    run = cfg.run_dict()
    assert "search" not in run and "ablation" not in run
    assert run["train"]["epochs"] == 8 and run["method"]["contrastive"]["kind"] == "infonce"


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")) + sorted((REPO / "ablations").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_file_validates(path):
    cfg = load_config(path)
    assert cfg.search is not None or cfg.ablation is not None


def test_no_file_gives_the_defaults():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.search is None and cfg.ablation is None


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing here\n"])
def test_an_empty_file_is_refused_instead_of_running_the_defaults(tmp_path, text):
    _assert_user_error(_run_cli([str(_write(tmp_path, text))], tmp_path), "is empty", "built-in defaults")
    assert not (tmp_path / "out").exists()


def test_a_binary_file_is_refused_in_one_paragraph(tmp_path):
    config = tmp_path / "model.pt"
    config.write_bytes(bytes(range(256)) * 4)
    _assert_user_error(_run_cli([str(config)], tmp_path), "is not a text file", "search_spaces/digits.yaml")


# --- apply_overrides on free-form mappings ----------------------------------------------------------


def test_apply_overrides_free_form_mappings_take_the_rest_of_the_key():
    raw: dict = {"student": {"arch": "small_cnn"}}
    apply_overrides(raw, {
        "student.kwargs.width": 8,
        "search.space.method.temperature": {"type": "uniform", "low": 1, "high": 4},
        "scaling.resources_per_worker.CPU": 0.5,
        "ablation.variants.no_contrast.method.contrastive.kind": "none",
        "ablation.variants.no_contrast.method.compensation.beta": 2.0,
        "ablation.variants.full": {},
        "ablation.tune.space.train.lr": {"type": "loguniform", "low": 0.1, "high": 10},
        "ablation.tune.variant_space.ard.method.temperature": {"type": "uniform", "low": 1, "high": 30},
        "train.epochs": 3,
    })
    assert raw["student"] == {"arch": "small_cnn", "kwargs": {"width": 8}}
    assert raw["search"]["space"] == {"method.temperature": {"type": "uniform", "low": 1, "high": 4}}
    assert raw["scaling"]["resources_per_worker"] == {"CPU": 0.5}
    assert raw["ablation"]["variants"]["no_contrast"] == {"method.contrastive.kind": "none",
                                                          "method.compensation.beta": 2.0}
    assert raw["ablation"]["variants"]["full"] == {}
    assert raw["ablation"]["tune"] == {"space": {"train.lr": {"type": "loguniform", "low": 0.1, "high": 10}},
                                       "variant_space": {"ard": {"method.temperature": {"type": "uniform", "low": 1,
                                                                                        "high": 30}}}}
    assert raw["train"] == {"epochs": 3}


def test_free_form_overrides_through_load_config():
    cfg = load_config(REPO / "ablations" / "digits.yaml", [
        "ablation.variants.no_contrastive.method.contrastive.kind=relation",
        "ablation.variants.extra.method.name=rslad",
        "search.space.train.lr={type: loguniform, low: 0.001, high: 0.1}",
        "student.kwargs.width=8",
    ])
    assert cfg.ablation is not None
    assert cfg.ablation.variants["no_contrastive"] == {"method.contrastive.kind": "relation"}
    assert cfg.ablation.variants["extra"] == {"method.name": "rslad"}
    assert cfg.ablation.variants["crdnd"] == {}
    assert cfg.search is not None and cfg.search.space["train.lr"].type == "loguniform"
    assert cfg.student.kwargs == {"width": 8}


def test_search_space_entries_are_validated():
    with pytest.raises(ConfigError, match=r"search\.space\.train\.lr"):
        load_config(DIGITS, ["search.space.train.lr={type: loguniform, low: 0, high: 0.1}"])
