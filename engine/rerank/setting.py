"""A method setting: a method's name, its validated parameters and where they came from.

A query, a leave-one-out run or a score resolves the setting of each method once (checking
the parameter names and ranges once, in `RerankParams.from_mapping`) and passes it down, so
that the fitted method, its cached runs and the page's label all use the same parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from engine.rerank import get_reranker_class

AUTHORS_DEFAULTS = "authors' defaults"
PRESET = "preset"
CUSTOM = "custom"
"""Source of a setting that differs from both the gallery's preset and the authors' defaults."""


@dataclass(frozen=True)
class MethodSetting:
    """method: a registered name (or the baseline, whose params are empty). params: complete
    and validated (every field of the method's Params). source: `AUTHORS_DEFAULTS`, `PRESET`
    or `CUSTOM` ("" for the baseline)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """Identifies the setting in caches and job keys."""
        return self.method, tuple(sorted(self.params.items()))

    @property
    def is_default(self) -> bool:
        """The gallery's default for the method (its preset, else the authors' defaults)."""
        return self.source != CUSTOM


def default_setting(method: str, presets: Mapping[str, Mapping[str, Any]]) -> MethodSetting:
    """The setting a method runs with on a gallery unless told otherwise: the gallery's preset,
    else the paper's defaults."""
    if method in presets:
        return MethodSetting(method, dict(presets[method]), PRESET)
    return MethodSetting(method, dict(_authors_defaults(method)), AUTHORS_DEFAULTS)


@functools.cache
def _authors_defaults(method: str) -> Mapping[str, Any]:
    """The paper's defaults of a method, validated once per process."""
    return MappingProxyType(get_reranker_class(method).Params().as_dict())


def resolve_setting(method: str, params: Mapping[str, Any] | MethodSetting | None,
                    presets: Mapping[str, Mapping[str, Any]]) -> MethodSetting:
    """The setting of `method` for `params` (None: the default setting; a `MethodSetting` is
    returned as it is). Unknown names, wrong types and out-of-range values raise
    InvalidInputError; a setting equal to the default takes the default's source."""
    if isinstance(params, MethodSetting):
        return params
    default = default_setting(method, presets)
    if params is None:
        return default
    validated = get_reranker_class(method).Params.from_mapping(method, params).as_dict()
    return MethodSetting(method, validated,
                         default.source if validated == default.params else CUSTOM)
