"""Method settings: resolved once (names, types, ranges checked in one place), with a source."""

from __future__ import annotations

import pytest

from engine.errors import InvalidInputError
from engine.rerank import get_reranker_class
from engine.rerank.setting import (
    AUTHORS_DEFAULTS,
    CUSTOM,
    PRESET,
    MethodSetting,
    default_setting,
    resolve_setting,
)

DEFAULTS = get_reranker_class("k_reciprocal").Params().as_dict()


def test_the_default_setting_is_the_preset_else_the_authors_defaults():
    preset = {**DEFAULTS, "k1": 5}
    assert default_setting("k_reciprocal", {}) == MethodSetting("k_reciprocal", DEFAULTS,
                                                                AUTHORS_DEFAULTS)
    assert default_setting("k_reciprocal", {"k_reciprocal": preset}) == MethodSetting(
        "k_reciprocal", preset, PRESET)


def test_params_are_validated_completed_and_labelled_by_their_source():
    preset = {**DEFAULTS, "k1": 5}
    presets = {"k_reciprocal": preset}
    assert resolve_setting("k_reciprocal", None, presets).source == PRESET
    same = resolve_setting("k_reciprocal", {"k1": 5.0}, presets)  # a slider's float
    assert same == MethodSetting("k_reciprocal", preset, PRESET) and same.is_default
    assert isinstance(same.params["k1"], int)
    custom = resolve_setting("k_reciprocal", {"k1": 7}, presets)
    assert custom.source == CUSTOM and not custom.is_default
    assert custom.params == {**DEFAULTS, "k1": 7}
    assert custom.key == ("k_reciprocal", tuple(sorted(custom.params.items())))
    assert resolve_setting("k_reciprocal", {"k1": 20}, {}).source == AUTHORS_DEFAULTS


def test_a_resolved_setting_passes_through_unchecked_again(monkeypatch):
    setting = resolve_setting("k_reciprocal", {"k1": 7}, {})
    params_class = get_reranker_class("k_reciprocal").Params

    def refuse(*args, **kwargs):
        raise AssertionError("validated a second time")

    monkeypatch.setattr(params_class, "from_mapping", classmethod(refuse))
    assert resolve_setting("k_reciprocal", setting, {}) is setting


@pytest.mark.parametrize(("params", "message"), [
    ({"bogus": 1}, r"k_reciprocal has no parameter\(s\) \['bogus'\]; it takes \['k1', 'k2', "
                   r"'lambda_value'\]"),
    ({"k1": -3}, r"k1=-3 is below its minimum 1"),
    (3, r"the parameters of k_reciprocal must be a mapping of name to value, got int"),
])
def test_bad_params_are_refused_with_the_reason(params, message):
    with pytest.raises(InvalidInputError, match=message):
        resolve_setting("k_reciprocal", params, {})


def test_the_authors_defaults_scale_to_the_gallery_where_the_method_says_so():
    from engine.rerank.setting import scaled_source

    ssr = get_reranker_class("ssr").Params().as_dict()
    small = default_setting("ssr", {}, gallery_size=60)
    assert small.params == {**ssr, "episodes": 300} and small.is_default
    assert small.source == "authors' defaults (episodes scaled to 60 images)"
    assert small.source == scaled_source(["episodes"], 60)
    assert small.source.startswith(AUTHORS_DEFAULTS)
    # large galleries, methods without overrides and unknown sizes keep the authors' values
    assert default_setting("ssr", {}, gallery_size=5000) == MethodSetting("ssr", ssr,
                                                                          AUTHORS_DEFAULTS)
    assert default_setting("ssr", {}) == MethodSetting("ssr", ssr, AUTHORS_DEFAULTS)
    assert default_setting("k_reciprocal", {}, gallery_size=60).source == AUTHORS_DEFAULTS


def test_a_user_value_or_a_preset_is_never_scaled():
    preset = {**get_reranker_class("ssr").Params().as_dict(), "episodes": 1500}
    assert default_setting("ssr", {"ssr": preset}, gallery_size=60) == MethodSetting(
        "ssr", preset, PRESET)
    asked = resolve_setting("ssr", {"episodes": 3000}, {}, gallery_size=60)
    assert asked.params["episodes"] == 3000 and asked.source == AUTHORS_DEFAULTS
    other = resolve_setting("ssr", {"episodes": 500}, {}, gallery_size=60)
    assert other.params["episodes"] == 500 and other.source == CUSTOM
    same = resolve_setting("ssr", {"episodes": 300}, {}, gallery_size=60)
    assert same == default_setting("ssr", {}, gallery_size=60)
