"""A method setting: a method's name, its validated parameters and where they came from.

A query, a leave-one-out run or a score resolves the setting of each method once (checking
the parameter names and ranges once, in `RerankParams.from_mapping`) and passes it down, so
that the fitted method, its cached runs and the page's label all use the same parameters.

Resolved for a gallery (`gallery_size`), the authors' defaults take the method's
`RerankParams.for_gallery` overrides (SSR's training episodes scale down on a small gallery);
the source then says so: "authors' defaults (episodes scaled to 60 images)" (`scaled_source`).
A user's value and a gallery's preset are never scaled.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
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
    """`AUTHORS_DEFAULTS`, `scaled_source(...)` (which starts with it), `PRESET` or
    `CUSTOM`."""

    @property
    def key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """Identifies the setting in caches and job keys."""
        return self.method, tuple(sorted(self.params.items()))

    @property
    def is_default(self) -> bool:
        """The gallery's default for the method (its preset, else the authors' defaults)."""
        return self.source != CUSTOM


def default_setting(method: str, presets: Mapping[str, Mapping[str, Any]], *,
                    gallery_size: int | None = None) -> MethodSetting:
    """The setting a method runs with on a gallery unless told otherwise: the gallery's preset,
    else the paper's defaults, with the method's overrides for a gallery of `gallery_size`
    items (`RerankParams.for_gallery`; None: unscaled)."""
    if method in presets:
        return MethodSetting(method, dict(presets[method]), PRESET)
    defaults = _authors_defaults(method)
    if gallery_size is None:
        return MethodSetting(method, dict(defaults), AUTHORS_DEFAULTS)
    scaled = _scaled_defaults(method, int(gallery_size))
    changed = [name for name in scaled if scaled[name] != defaults[name]]
    return MethodSetting(method, dict(scaled),
                         scaled_source(changed, gallery_size) if changed else AUTHORS_DEFAULTS)


def scaled_source(names: Sequence[str], gallery_size: int) -> str:
    """The source of authors' defaults with `names` scaled to a gallery: "authors' defaults
    (episodes scaled to 60 images)"."""
    return f"{AUTHORS_DEFAULTS} ({', '.join(names)} scaled to {gallery_size:,} images)"


@functools.cache
def _authors_defaults(method: str) -> Mapping[str, Any]:
    """The paper's defaults of a method, validated once per process."""
    return MappingProxyType(get_reranker_class(method).Params().as_dict())


@functools.lru_cache(maxsize=256)
def _scaled_defaults(method: str, gallery_size: int) -> Mapping[str, Any]:
    """The paper's defaults with the method's overrides for a gallery of `gallery_size`,
    validated (an override out of range is a bug of the method: it raises)."""
    params = get_reranker_class(method).Params
    return MappingProxyType(params(**params.for_gallery(gallery_size)).as_dict())


def resolve_setting(method: str, params: Mapping[str, Any] | MethodSetting | None,
                    presets: Mapping[str, Mapping[str, Any]], *,
                    gallery_size: int | None = None) -> MethodSetting:
    """The setting of `method` for `params` (None: the default setting for a gallery of
    `gallery_size`; a `MethodSetting` is returned as it is). Unknown names, wrong types and
    out-of-range values raise InvalidInputError; a setting equal to the default takes the
    default's source, one equal to the unscaled authors' defaults `AUTHORS_DEFAULTS`."""
    if isinstance(params, MethodSetting):
        return params
    default = default_setting(method, presets, gallery_size=gallery_size)
    if params is None:
        return default
    validated = get_reranker_class(method).Params.from_mapping(method, params).as_dict()
    if validated == default.params:
        source = default.source
    elif method not in presets and validated == _authors_defaults(method):
        source = AUTHORS_DEFAULTS
    else:
        source = CUSTOM
    return MethodSetting(method, validated, source)
