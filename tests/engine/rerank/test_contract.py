"""The shared re-ranker contract, run against every registered method on real features."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import ClassVar

import numpy as np
import pytest
from oracles import gnn_atol, icfrr_atol, k_reciprocal_atol
from tie_aware import U32, assert_order_matches

import engine.rerank as rerank_package
from engine.errors import InvalidInputError, NotFittedError, UnknownNameError
from engine.rerank import (
    Evidence,
    EvidenceGroup,
    GalleryContext,
    Reranker,
    RerankParams,
    RerankResult,
    create_reranker,
    get_reranker_class,
    list_rerankers,
    register,
)

METHODS = list_rerankers()
N_GALLERY, N_QUERIES = 120, 6


def make(name: str, **params) -> Reranker:
    """The method with its declared `quick_params` (shorter training, fewer iterations: the
    contract is about shapes and behaviour; each method's own tests check what it computes)."""
    cls = get_reranker_class(name)
    params = {**cls.quick_params, **params}
    # methods with a device argument run on the CPU here (a GPU test would be marked `gpu`)
    if "device" in inspect.signature(cls).parameters:
        return cls(device="cpu", **params)
    return cls(**params)


@pytest.fixture(scope="module")
def features(demo_features) -> tuple[np.ndarray, np.ndarray]:
    """(queries, gallery): real features, every class in both."""
    rows = np.arange(len(demo_features.paths))
    query_rows = rows[::48][:N_QUERIES]
    gallery_rows = np.setdiff1d(rows, query_rows)[:: 2][:N_GALLERY]
    return demo_features.features[query_rows], demo_features.features[gallery_rows]


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, features) -> Reranker:
    return make(request.param).fit(features[1])


def assert_contract(result: RerankResult, n_queries: int, k: int, gallery_size: int,
                    leave_one_out: bool = False) -> None:
    assert isinstance(result, RerankResult)
    assert result.indices.shape == result.distances.shape == (n_queries, k)
    assert result.indices.dtype == np.int64 and result.distances.dtype == np.float32
    assert ((result.indices >= 0) & (result.indices < gallery_size)).all()
    for row in result.indices:
        assert len(set(row.tolist())) == k
    assert np.isfinite(result.distances).all()
    assert (np.diff(result.distances, axis=1) >= -1e-6).all()
    if leave_one_out:
        assert not (result.indices == np.arange(n_queries)[:, None]).any()
    assert isinstance(result.details, dict)


def run_atol(reranker: Reranker, n_nodes: int) -> float:
    """A method's bound on the float32 error of its distances (oracles.py derives each); for a
    method not listed, the largest of them. n_nodes: gallery items and queries in its graph."""
    p, dim = reranker.params, reranker.gallery.features.shape[1]
    bounds = {
        "gnn": lambda: gnn_atol(n_nodes, p.k1, p.k2, p.lambda_value, dim),
        "icfrr": lambda: icfrr_atol(p.beta, min(p.KQ, n_nodes)),
        "k_reciprocal": lambda: k_reciprocal_atol(n_nodes, p.k2, p.lambda_value),
        # 1 - the cosine of two unit vectors, the refined query normalised in float32: a norm
        # and a dot product of dim terms each
        "ssr": lambda: (2 * dim + 4) * U32,
    }
    if reranker.name in bounds:
        return bounds[reranker.name]()
    return max(gnn_atol(n_nodes, 1, 2, 1.0, dim), k_reciprocal_atol(n_nodes, 1, 0.0),
               (2 * dim + 4) * U32)


def assert_same_ranking(a: RerankResult, b: RerankResult, reranker: Reranker) -> None:
    """`a` ranks like the full ranking `b` of the same query by the same method up to float
    ties (`tie_aware`): two runs whose float32 sums went in other orders (online and batch),
    each within the method's `run_atol` of the exact distances, so 2 * run_atol apart."""
    assert b.indices.shape[1] == reranker.gallery.size  # b is a full ranking
    by_item = np.empty(b.distances.shape)
    np.put_along_axis(by_item, b.indices, b.distances, axis=1)
    atol = 2 * run_atol(reranker, reranker.gallery.size + len(a.indices))
    assert_order_matches(a.indices, by_item, atol=atol, values=a.distances)


# -- registry ------------------------------------------------------------------------------------
def test_registry_lists_the_known_methods():
    assert {"k_reciprocal", "gnn"} <= set(METHODS)
    for name in METHODS:
        cls = get_reranker_class(name)
        assert cls.name == name and issubclass(cls, Reranker)
        assert cls.title


def test_baselines_are_listed_after_the_re_rankers():
    """The page's tabs open on a re-ranker: the practitioners' baselines follow them."""
    flags = [get_reranker_class(name).baseline for name in METHODS]
    assert flags == sorted(flags) and any(flags) and not all(flags)
    assert {name for name in METHODS if get_reranker_class(name).baseline} == {
        "aqe", "alpha_qe", "dba", "diffusion"}


def test_unknown_name():
    with pytest.raises(UnknownNameError, match="no re-ranker named 'nope'"):
        create_reranker("nope")
    with pytest.raises(KeyError):  # UnknownNameError is also a KeyError
        get_reranker_class("nope")


def test_duplicate_registration_is_refused(monkeypatch):
    monkeypatch.setattr(rerank_package, "_REGISTRY", dict(rerank_package._REGISTRY))
    taken = METHODS[0]

    class Impostor(Reranker):
        name = taken

        def _rerank_batch(self, query_features, k):
            raise NotImplementedError

        def _rerank_online(self, query_feature, k):
            raise NotImplementedError

    with pytest.raises(InvalidInputError, match="already registered"):
        register(Impostor)
    assert get_reranker_class(taken) is not Impostor
    # registering the same class again is harmless
    original = get_reranker_class(taken)
    assert register(original) is original

    class Nameless(Impostor):
        name: ClassVar[str] = ""

    with pytest.raises(InvalidInputError, match="non-empty"):
        register(Nameless)


# -- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_default_params(name):
    reranker = create_reranker(name)
    assert isinstance(reranker.params, reranker.Params)
    assert reranker.params == reranker.Params()
    assert not reranker.is_fitted
    described = reranker.Params.describe()
    assert [d["name"] for d in described] == [f.name for f in dataclasses.fields(reranker.Params)]
    for entry in described:
        assert {"name", "type", "default", "min", "max", "step", "help"} <= set(entry)
        assert entry["help"]
        value = getattr(reranker.params, entry["name"])
        if entry["min"] is not None:
            assert value >= entry["min"]
        if entry["max"] is not None:
            assert value <= entry["max"]
    assert reranker.params.as_dict() == {d["name"]: d["default"] for d in described}
    assert name in repr(reranker) or type(reranker).__name__ in repr(reranker)


@pytest.mark.parametrize("name", METHODS)
def test_declared_capabilities_and_quick_params(name):
    """Flags are booleans; `quick_params` are valid overrides (known names, inside the bounds)
    that change something, and every method that learns declares a short run."""
    cls = get_reranker_class(name)
    for flag in ("learns", "runs_on_gpu", "online_is_batch", "exact_neighbours"):
        assert isinstance(getattr(cls, flag), bool), flag
    assert isinstance(cls.quick_params, dict)
    quick = make(name).params
    assert quick == cls.Params(**cls.quick_params)
    assert (quick != cls.Params()) == bool(cls.quick_params)
    if cls.learns:
        assert cls.quick_params, f"{name} learns: declare quick_params for fast tests"


def bound_cases() -> list[tuple[str, str, object]]:
    cases = []
    for name in METHODS:
        for spec in dataclasses.fields(get_reranker_class(name).Params):
            low, high = spec.metadata.get("min"), spec.metadata.get("max")
            step = spec.metadata.get("step") or 1
            if low is not None:
                cases.append((name, spec.name, low - step))
            if high is not None:
                cases.append((name, spec.name, high + step))
    return cases


@pytest.mark.parametrize(("name", "field", "value"), bound_cases())
def test_params_outside_bounds(name, field, value):
    with pytest.raises(InvalidInputError, match=field):
        create_reranker(name, **{field: value})


@pytest.mark.parametrize("name", METHODS)
def test_params_at_bounds_and_non_finite(name):
    cls = get_reranker_class(name)
    for spec in dataclasses.fields(cls.Params):
        for bound in ("min", "max"):
            if spec.metadata.get(bound) is not None:
                value = spec.metadata[bound]
                if spec.type in ("int", int):
                    value = int(value)
                cls.Params(**{spec.name: value})  # inclusive bounds
        if spec.type in ("float", float):
            with pytest.raises(InvalidInputError, match="finite"):
                cls.Params(**{spec.name: float("nan")})
        if spec.type in ("int", int):
            with pytest.raises(InvalidInputError, match="integer"):
                cls.Params(**{spec.name: spec.default + 0.5})


@pytest.mark.parametrize("name", METHODS)
def test_unknown_param(name):
    with pytest.raises(InvalidInputError, match="no parameter"):
        create_reranker(name, not_a_parameter=1)


@pytest.mark.parametrize("name", METHODS)
def test_params_object_or_overrides(name):
    cls = get_reranker_class(name)
    params = cls.Params()
    assert cls(params).params is params
    first = dataclasses.fields(cls.Params)[0].name
    with pytest.raises(InvalidInputError, match="either"):
        cls(params, **{first: getattr(params, first)})
    with pytest.raises(InvalidInputError, match="expects"):
        cls(RerankParams())


def test_params_are_frozen():
    params = create_reranker(METHODS[0]).params
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.__setattr__(dataclasses.fields(params)[0].name, 3)


# -- fitting and input checks --------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_rerank_before_fit(name, features):
    reranker = make(name)
    with pytest.raises(NotFittedError, match="fit"):
        reranker.rerank(features[0], 5)
    with pytest.raises(NotFittedError):
        reranker.rerank(None, 5)


@pytest.mark.parametrize("name", METHODS)
def test_gallery_of_one(name, features):
    with pytest.raises(InvalidInputError, match=r"at least \d+ items, got 1"):
        make(name).fit(features[1][:1])


@pytest.mark.parametrize("name", METHODS)
def test_bad_gallery(name, features):
    gallery = features[1][:10].copy()
    gallery[3, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        make(name).fit(gallery)
    with pytest.raises(InvalidInputError, match="empty"):
        make(name).fit(np.zeros((0, 4), np.float32))


def test_k_out_of_range(fitted, features):
    queries = features[0][:2]
    with pytest.raises(InvalidInputError, match="larger than"):
        fitted.rerank(queries, N_GALLERY + 1)
    with pytest.raises(InvalidInputError, match="larger than"):
        fitted.rerank(queries, N_GALLERY + 1, mode="online")
    with pytest.raises(InvalidInputError, match="larger than"):
        fitted.rerank(None, N_GALLERY)  # leave-one-out can return G - 1 items
    for k in (0, -1, True, 2.5):
        with pytest.raises(InvalidInputError, match="positive integer"):
            fitted.rerank(queries, k)


def test_nan_query(fitted, features):
    queries = features[0][:3].copy()
    queries[1, 5] = np.nan
    for mode in ("batch", "online"):
        with pytest.raises(InvalidInputError, match="NaN"):
            fitted.rerank(queries, 5, mode=mode)


def test_wrong_dimension(fitted, features):
    with pytest.raises(InvalidInputError, match="dimensions"):
        fitted.rerank(features[0][:2, :100], 5)
    with pytest.raises(InvalidInputError, match="dimensions"):
        fitted.rerank_online(features[0][0, :100], 5)


def test_bad_mode(fitted, features):
    with pytest.raises(InvalidInputError, match="mode"):
        fitted.rerank(features[0][:1], 5, mode="streaming")
    with pytest.raises(InvalidInputError, match="leave-one-out"):
        fitted.rerank(None, 5, mode="online")


# -- results -------------------------------------------------------------------------------------
def test_batch_results(fitted, features):
    queries = features[0]
    for k in (1, 10, None):
        result = fitted.rerank(queries, k)
        assert_contract(result, N_QUERIES, k or N_GALLERY, N_GALLERY)


def test_online_results(fitted, features):
    queries = features[0][:3]
    result = fitted.rerank(queries, 10, mode="online")
    assert_contract(result, 3, 10, N_GALLERY)
    assert len(result.details["per_query"]) == 3
    single = fitted.rerank_online(queries[0], 10)  # a (d,) vector is one query
    assert_contract(single, 1, 10, N_GALLERY)
    assert "per_query" not in single.details


def test_leave_one_out_results(fitted):
    for k in (5, None):
        result = fitted.rerank(None, k)
        assert_contract(result, N_GALLERY, k or N_GALLERY - 1, N_GALLERY, leave_one_out=True)


def test_online_equals_batch_with_that_query(fitted, features):
    if not fitted.online_is_batch:
        pytest.skip(f"{fitted.name}'s batch mode learns on the queries (online_is_batch)")
    for query in features[0]:
        online = fitted.rerank_online(query)
        batch = fitted.rerank(query[None, :])
        assert_contract(online, 1, N_GALLERY, N_GALLERY)
        assert_same_ranking(online, batch, fitted)
        # and the top-k cut agrees with the full ranking
        assert_same_ranking(fitted.rerank_online(query, 7), online, fitted)


# -- evidence ------------------------------------------------------------------------------------
def test_explain_gives_evidence_for_the_top_and_a_far_item(fitted, features):
    """`explain` answers in the one schema for the online ranking's first item and its last."""
    query = features[0][0]
    ranking = fitted.rerank_online(query)
    for item in (int(ranking.indices[0, 0]), int(ranking.indices[0, -1])):
        evidence = fitted.explain(query, item)
        assert isinstance(evidence, Evidence)
        assert evidence.method == fitted.name and evidence.item == item
        assert isinstance(evidence.summary, str) and evidence.summary
        assert all(np.isfinite(float(value)) for value in evidence.numbers.values())
        for group in evidence.groups:
            assert isinstance(group, EvidenceGroup)
            assert group.rows.shape == group.values.shape
            assert ((group.rows >= 0) & (group.rows < N_GALLERY)).all()
        as_dict = json.loads(json.dumps(evidence.as_dict()))
        assert as_dict["method"] == fitted.name and as_dict["item"] == item
    assert fitted.explain(query[None, :], item).item == item  # a (1, d) query is one query


def test_explain_refuses_bad_items_and_queries(fitted, features):
    query = features[0][0]
    for item in (-1, N_GALLERY, 2.0, True, "3", None):
        with pytest.raises(InvalidInputError, match="item"):
            fitted.explain(query, item)
    with pytest.raises(InvalidInputError, match="one query"):
        fitted.explain(features[0][:2], 0)
    broken = query.copy()
    broken[3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        fitted.explain(broken, 0)


@pytest.mark.parametrize("name", METHODS)
def test_explain_before_fit(name, features):
    with pytest.raises(NotFittedError, match="fit"):
        make(name).explain(features[0][0], 0)


def test_reranking_keeps_near_duplicates_first(fitted, features):
    """A query that is a gallery item (tiny noise) ranks that item first, in every mode."""
    if not fitted.exact_neighbours:
        pytest.skip(f"{fitted.name} declares exact_neighbours = False: it may rank another item "
                    "before a near-duplicate (see its docstring)")
    gallery = fitted.gallery.features
    rng = np.random.default_rng(3)
    rows = np.array([4, 50, 99])
    queries = gallery[rows] + 1e-4 * rng.standard_normal((3, gallery.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for mode in ("batch", "online"):
        np.testing.assert_array_equal(fitted.rerank(queries, 3, mode=mode).indices[:, 0], rows)


def test_results_are_deterministic(fitted, features):
    a, b = fitted.rerank(features[0], 20), fitted.rerank(features[0], 20)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_fit_accepts_a_context(features):
    for name in METHODS:
        gallery = features[1][:30]
        from_array = make(name).fit(gallery).rerank(features[0], 10)
        from_context = make(name).fit(GalleryContext(gallery, fingerprint="abc")).rerank(
            features[0], 10)
        np.testing.assert_array_equal(from_array.indices, from_context.indices)


def refuses_small(name: str, size: int) -> bool:
    """True (after checking the refusal) when the method declares it needs more items."""
    if get_reranker_class(name).min_gallery <= size:
        return False
    with pytest.raises(InvalidInputError, match="at least"):
        make(name).fit(np.tile(np.eye(1, 16, dtype=np.float32), (size, 1)))
    return True


@pytest.mark.parametrize("name", METHODS)
def test_small_gallery_clamps_parameters(name, features):
    if refuses_small(name, 8):
        return
    reranker = make(name)
    gallery = features[1][:8]
    reranker.fit(gallery)
    k1 = getattr(reranker.params, "k1", None)
    batch = reranker.rerank(features[0][:2])
    online = reranker.rerank_online(features[0][0])
    loo = reranker.rerank(None)
    assert_contract(batch, 2, 8, 8)
    assert_contract(online, 1, 8, 8)
    assert_contract(loo, 8, 7, 8, leave_one_out=True)
    if k1 is not None and k1 > 10:
        for result in (batch, online, loo):
            assert "clamped" in result.details, result.details
            assert result.details["k1"] < k1
    if reranker.online_is_batch:
        assert_same_ranking(online, reranker.rerank(features[0][:1]), reranker)


@pytest.mark.parametrize("name", METHODS)
def test_two_item_gallery(name, features):
    if refuses_small(name, 2):
        return
    reranker = make(name).fit(features[1][:2])
    assert_contract(reranker.rerank(features[0], 2), N_QUERIES, 2, 2)
    assert_contract(reranker.rerank_online(features[0][0], 2), 1, 2, 2)
    assert_contract(reranker.rerank(None), 2, 1, 2, leave_one_out=True)


@pytest.mark.parametrize("name", METHODS)
def test_duplicate_gallery_items(name, features):
    """Exact duplicates make exact ties: the contract still holds, online still equals batch."""
    base = features[1][:20]
    gallery = np.vstack([base, base[:5]])
    reranker = make(name).fit(gallery)
    queries = np.vstack([base[:2], features[0][:2]])
    assert_contract(reranker.rerank(queries), 4, 25, 25)
    assert_contract(reranker.rerank(None), 25, 24, 25, leave_one_out=True)
    for query in queries:
        online = reranker.rerank_online(query)
        assert_contract(online, 1, 25, 25)
        if reranker.online_is_batch:
            assert_same_ranking(online, reranker.rerank(query[None, :]), reranker)


@pytest.mark.parametrize("name", list_rerankers())
def test_shared_gallery_graph_gives_the_same_results(name, split_features):
    """Fitting on the gallery's cached kNN graph equals fitting on bare features."""
    from engine.core.knn import knn_graph
    from engine.rerank import GalleryContext

    queries, gallery = split_features
    context = GalleryContext(gallery, knn=knn_graph(gallery, 64))
    shared = make(name).fit(context)
    bare = make(name).fit(gallery)
    for mode in ("batch", "online"):
        with_graph, without = shared.rerank(queries, 15, mode=mode), bare.rerank(queries, 15,
                                                                                 mode=mode)
        np.testing.assert_array_equal(with_graph.indices, without.indices)
        np.testing.assert_array_equal(with_graph.distances, without.distances)


@pytest.mark.parametrize("name", list_rerankers())
def test_integral_float_parameters_become_ints(name):
    """UI sliders send 20.0: integer fields accept it as 20, and refuse 20.5 or '20'."""
    cls = get_reranker_class(name)
    integer_fields = [f.name for f in dataclasses.fields(cls.Params) if f.type in ("int", int)]
    for field_name in integer_fields:
        default = getattr(cls.Params(), field_name)
        params = cls.Params(**{field_name: float(default)})
        assert getattr(params, field_name) == default
        assert type(getattr(params, field_name)) is int
        with pytest.raises(InvalidInputError):
            cls.Params(**{field_name: default + 0.5})
        with pytest.raises(InvalidInputError):
            cls.Params(**{field_name: str(default)})


@pytest.mark.parametrize("name", list_rerankers())
def test_features_must_be_unit_norm(name, split_features):
    queries, gallery = split_features
    with pytest.raises(InvalidInputError, match="L2-normalised"):
        make(name).fit(gallery * 2.0)
    reranker = make(name).fit(gallery)
    with pytest.raises(InvalidInputError, match="L2-normalised"):
        reranker.rerank(queries * 0.5)
    with pytest.raises(InvalidInputError, match="L2-normalised"):
        reranker.rerank(np.zeros_like(queries[:1]))


@pytest.mark.parametrize("name", list_rerankers())
def test_all_identical_gallery_gives_a_valid_ranking(name, split_features):
    """Every distance zero (k-reciprocal's row maximum is 0): a ranking, not NaN."""
    _, gallery = split_features
    if refuses_small(name, 6):
        return
    identical = np.tile(gallery[:1], (6, 1))
    for mode in ("batch", "online"):
        result = make(name).fit(identical).rerank(gallery[:1], 3, mode=mode)
        assert np.isfinite(result.distances).all()


# -- fit leaves its inputs alone and takes progress as an argument -----------------------------
@pytest.fixture(scope="module")
def full_context(demo_features) -> GalleryContext:
    """A context with every field a method may read: features, the shared kNN graph, labels and
    a labelled training set."""
    from engine.core.knn import knn_graph
    from engine.core.types import TrainingSet

    rows = np.arange(len(demo_features.paths))
    gallery, training = rows[::2][:N_GALLERY], rows[1::2][:N_GALLERY]
    features = demo_features.features[gallery]
    return GalleryContext(
        features, knn=knn_graph(features, 32), fingerprint="contract",
        labels=demo_features.labels[gallery].astype(np.int64),
        training=TrainingSet(demo_features.features[training],
                             demo_features.labels[training].astype(np.int64), "training"))


def context_arrays(context: GalleryContext) -> dict[str, np.ndarray]:
    return {"features": context.features, "knn.indices": context.knn.indices,
            "knn.similarities": context.knn.similarities, "knn.farthest": context.knn.farthest,
            "labels": context.labels, "training.features": context.training.features,
            "training.labels": context.training.labels}


@pytest.mark.parametrize("name", METHODS)
def test_fit_and_rerank_leave_the_callers_arrays_bit_identical(name, full_context):
    """`fit` (and `rerank`) never write into the caller's arrays or context: every array is
    bit-identical afterwards, and the context still holds the very same objects."""
    context = dataclasses.replace(full_context)
    before = {key: value.copy() for key, value in context_arrays(context).items()}
    objects = {key: id(value) for key, value in context_arrays(context).items()}
    queries = full_context.training.features[:4]
    queries_before = queries.copy()
    reranker = make(name).fit(context)
    reranker.rerank(queries, 10)
    reranker.rerank(queries[:1], 10, mode="online")
    after = context_arrays(context)
    assert {key: id(value) for key, value in after.items()} == objects
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
        assert after[key].tobytes() == value.tobytes(), f"{name} changed the caller's {key}"
    assert queries.tobytes() == queries_before.tobytes()


@pytest.mark.parametrize("name", [n for n in METHODS if get_reranker_class(n).learns])
def test_progress_is_an_argument_of_fit(name, full_context):
    """A method that learns reports its training to the callback given to `fit`, and keeps no
    reference to it afterwards (no `progress` attribute set from outside)."""
    reports: list[tuple[float, str]] = []
    reranker = make(name)
    assert not hasattr(reranker, "progress")
    reranker.fit(full_context, progress=lambda fraction, message: reports.append(
        (fraction, message)))
    assert reports and all(0.0 <= fraction <= 1.0 for fraction, _ in reports)
    count = len(reports)
    reranker.rerank(full_context.training.features[:2], 5)
    assert len(reports) == count


def test_details_hold_only_the_keys_each_method_documents(fitted, features):
    """`details` follows the method's `details_schema` (plus the common keys) in every mode:
    batch, leave-one-out, one online query and several."""
    from engine.rerank.base import COMMON_DETAILS

    schema = type(fitted).details_schema
    assert schema and all(isinstance(text, str) and text for text in schema.values())
    queries, _ = features
    runs = [fitted.rerank(queries[:3], 5), fitted.rerank(None, 5),
            fitted.rerank(queries[:1], 5, mode="online")]
    several = fitted.rerank(queries[:2], 5, mode="online")
    seen: set[str] = set()
    for details in [run.details for run in runs] + list(several.details.get("per_query", [])):
        assert set(details) <= set(schema), (fitted.name, sorted(set(details) - set(schema)))
        seen |= set(details)
    assert set(several.details) <= set(schema) | set(COMMON_DETAILS)
    assert seen, f"{fitted.name} returned no details to check"


@pytest.mark.parametrize("name", list_rerankers())
def test_fit_searches_nothing_when_the_graph_is_as_deep_as_the_method_says(name, monkeypatch):
    """`graph_depth` is a promise: given a shared graph that deep, fit runs no search of the
    whole gallery (the exact top-k behind every graph builder fails if called)."""
    import sys

    from engine.core.knn import knn_graph
    from engine.rerank import shared_graph_depth

    reranker = make(name, **get_reranker_class(name).quick_params)
    depth = reranker.graph_depth()
    if depth == 0:
        pytest.skip(f"{name} reads no shared graph")
    assert shared_graph_depth([name]) == make(name).graph_depth() > 0
    rng = np.random.default_rng(4)
    features = rng.normal(size=(80, 12)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    context = GalleryContext(features, knn=knn_graph(features, min(depth, 80)))

    def searched(*args, **kwargs):
        raise AssertionError(f"{name} searched the gallery although the graph is {depth} deep")

    patched = 0
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("engine.") and hasattr(module, "torch_topk_similar"):
            monkeypatch.setattr(module, "torch_topk_similar", searched)
            patched += 1
    assert patched >= 2  # engine.core.knn and the methods that import it
    reranker.fit(context)
    assert reranker.is_fitted
