"""Tests of ``engine.preflight``: names the schema leaves free are checked before any work, in every config a
command derives (ablation variants, search-space choices). The CLI side is in ``tests/test_cli.py``."""

from __future__ import annotations

import pytest

from conftest import small_config
from crdnd_ray.config import ConfigError
from crdnd_ray.engine.preflight import derived_configs, preflight


def test_an_unknown_method_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"the config: method.name 'crdn' is not a known method. Did you mean 'crdnd'\?"):
        preflight(small_config(**{"method.name": "crdn"}))


def test_variants_and_search_choices_are_checked_too():
    ablation = {"seeds": [0], "variants": {"full": {}, "typo": {"method.name": "rsald"}}}
    with pytest.raises(ConfigError, match=r"ablation.variants.typo: method.name 'rsald'.*Did you mean 'rslad'\?"):
        preflight(small_config(**{"ablation": ablation}))
    space = {"method.name": {"type": "choice", "values": ["crdnd", "iadd"]}}
    with pytest.raises(ConfigError, match=r"search.space.method.name: method.name 'iadd'.*Did you mean 'iad'\?"):
        preflight(small_config(**{"search.space": space}))
    cfg = small_config(**{"ablation": {"seeds": [0], "variants": {"a": {}, "b": {"method.name": "ard"}}},
                          "search.space": {"method.name": {"type": "choice", "values": ["sat"]}}})
    assert [(where, derived.method.name) for where, derived in derived_configs(cfg)] == [
        ("the config", "crdnd"), ("ablation.variants.a", "crdnd"), ("ablation.variants.b", "ard"),
        ("search.space.method.name", "sat")]
    preflight(cfg)
