"""SSR: the subgraph views, the feature update, the loss, training and the saved state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tie_aware import U32, assert_order_matches, perturb_ulps

from engine.errors import CacheError, InvalidInputError
from engine.rerank import GalleryContext, TrainingSet, create_reranker
from engine.rerank.ssr import (
    SubgraphRefiner,
    cosine_ranking,
    info_nce,
    list_average_precision,
    load_refiner,
    make_optimiser,
    sample_episode,
    save_refiner,
    subgraph_views,
    training_step,
)

QUICK = {"k": 12, "hidden": 32, "episodes": 30}


def unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def views_by_loop(nodes: np.ndarray) -> np.ndarray:
    """The notes' construction for one query, one reference at a time: order the database by
    similarity to the reference, take the similarity matrix of [r, q, d_(1..k)] and keep the
    strict upper triangle of its first two rows."""
    unit_nodes = unit(nodes.astype(np.float64))
    similarity = unit_nodes @ unit_nodes.T
    k = len(nodes) - 1
    rows = []
    for reference in range(k + 1):
        database = 1 + np.argsort(-similarity[reference, 1:], kind="stable")
        order = np.concatenate([[reference, 0], database])
        block = similarity[np.ix_(order, order)]
        rows.append(np.concatenate([block[0, 1:], block[1, 2:]]))
    return np.stack(rows)


def test_views_equal_the_loop_construction():
    rng = np.random.default_rng(0)
    nodes = rng.standard_normal((3, 9, 16)).astype(np.float32)
    batched = subgraph_views(torch.from_numpy(nodes)).numpy()
    assert batched.shape == (3, 9, 17)
    for query in range(3):
        np.testing.assert_allclose(batched[query], views_by_loop(nodes[query]), atol=1e-6)


def test_views_of_a_hand_worked_case():
    # q = e1; d1 = e2; d2 = (e1 + e2)/sqrt2: S(q,d1)=0, S(q,d2)=S(d1,d2)=0.7071
    nodes = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    c = 2 ** -0.5
    expected = [[1.0, c, 0.0, c, 0.0],   # r = q: database ordered d2, d1
                [0.0, 1.0, c, 0.0, c],   # r = d1: d1, d2
                [c, 1.0, c, c, 0.0]]     # r = d2: d2, d1
    np.testing.assert_allclose(subgraph_views(nodes)[0].numpy(), expected, atol=1e-6)


def test_one_update_is_the_vector_jacobian_product():
    """The query moves by -lr * J^T G, J the Jacobian of the views, G the network output."""
    torch.manual_seed(0)
    model = SubgraphRefiner(k=4, q_steps=1, lr_dni=0.1, hidden=8).eval()
    query = torch.randn(1, 6)
    database = torch.randn(1, 4, 6)

    def views_of(q):
        return subgraph_views(torch.cat([q[:, None, :], database], dim=1))

    jacobian = torch.autograd.functional.jacobian(views_of, query)  # (1, 5, 9, 1, 6)
    gradient = model.query_gradient(views_of(query)).detach()
    expected = query - 0.1 * torch.einsum("brv,brvcd->cd", gradient, jacobian)
    refined_query, _ = model.refine(query, database)
    torch.testing.assert_close(refined_query.detach(), expected, atol=1e-5, rtol=1e-5)


def test_row_norm_is_instance_norm():
    from engine.rerank.ssr import RowNorm

    reference = torch.nn.InstanceNorm1d(1, affine=True)
    ours = RowNorm()
    with torch.no_grad():
        for module in (reference, ours):
            module.weight.fill_(1.7)
            module.bias.fill_(-0.3)
    rows = torch.randn(5, 1, 13)
    torch.testing.assert_close(ours(rows), reference(rows))


def test_two_steps_train_through_both_updates():
    """The second step differentiates the first step's gradients again (third order)."""
    model = SubgraphRefiner(k=5, q_steps=2, lr_dni=1e-2, hidden=8).train()
    query = torch.randn(1, 8, requires_grad=True)
    model(query, torch.randn(1, 5, 8, requires_grad=True)).sum().backward()
    assert model.query_gradient.first.weight.grad.abs().sum() > 0
    assert model.database_gradient.first.weight.grad.abs().sum() > 0


def test_info_nce_by_hand():
    similarity = torch.tensor([0.9, 0.1, 0.5, 0.2])
    relevant = torch.tensor([True, False, True, False])
    known = torch.tensor([True, True, True, False])   # the last item is left out
    scale = torch.tensor(10.0)
    negatives = np.exp(10 * 0.1)
    expected = np.mean([-np.log(np.exp(9) / (np.exp(9) + negatives)),
                        -np.log(np.exp(5) / (np.exp(5) + negatives))])
    assert float(info_nce(similarity, relevant, known, scale)) == pytest.approx(expected, rel=1e-4)


def test_list_average_precision():
    assert list_average_precision(np.array([1, 0, 1], bool)) == pytest.approx((1 + 2 / 3) / 2)
    assert list_average_precision(np.zeros(3, bool)) == 0.0


def test_episodes_pass_the_authors_filter(demo_features):
    rng = np.random.default_rng(0)
    features, labels = demo_features.features, demo_features.labels
    accepted = 0
    for _ in range(200):
        episode = sample_episode(features, labels, 40, 200, rng)
        if episode is None:
            continue
        accepted += 1
        assert episode.query not in episode.top
        similarity = features[episode.top] @ features[episode.query]
        assert (np.diff(similarity) <= 1e-6).all()
        np.testing.assert_array_equal(episode.relevant,
                                      labels[episode.top] == labels[episode.query])
        assert episode.relevant.sum() > 5
        assert list_average_precision(episode.relevant) < 0.8
    assert accepted > 10


def test_a_tiny_model_overfits_a_few_episodes(demo_features):
    rng = np.random.default_rng(0)
    features, labels = demo_features.features, demo_features.labels
    episodes = []
    while len(episodes) < 4:
        episode = sample_episode(features, labels, 20, 100, rng)
        if episode is not None:
            episodes.append(episode)
    torch.manual_seed(0)
    model = SubgraphRefiner(k=20, q_steps=1, lr_dni=1e-2, hidden=32).train()
    optimiser = make_optimiser(model)
    table = torch.from_numpy(features)
    losses = [[training_step(model, optimiser, table, e)[0] for e in episodes]
              for _ in range(60)]
    assert np.mean(losses[-1]) < 0.8 * np.mean(losses[0])


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SubgraphRefiner(k=5, q_steps=2, lr_dni=1e-2, hidden=16).eval()
    manifest = {"k": 5, "q_steps": 2, "lr_dni": 1e-2, "hidden": 16,
                "features_fingerprint": "abc"}
    save_refiner(tmp_path / "state", model, manifest)
    loaded, loaded_manifest = load_refiner(tmp_path / "state", "abc", torch.device("cpu"))
    query, database = torch.randn(2, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(loaded(query, database), model(query, database), rtol=0, atol=0)
    assert loaded_manifest["q_steps"] == 2
    with pytest.raises(CacheError, match="other features"):
        load_refiner(tmp_path / "state", "another", torch.device("cpu"))
    (tmp_path / "state.safetensors").write_bytes(b"damaged")
    with pytest.raises(CacheError):
        load_refiner(tmp_path / "state", "abc", torch.device("cpu"))


@pytest.fixture(scope="module")
def held_out(demo_features):
    """Train on classes 0-5, judge on the others (as the oxford17-heldout protocol does)."""
    features, labels = demo_features.features, demo_features.labels
    train = labels < 6
    rows = np.flatnonzero(~train)
    queries, gallery = rows[::10], np.setdiff1d(rows, rows[::10])
    training = TrainingSet(features[train], labels[train], "classes 0-5")
    return (GalleryContext(features[gallery], labels=labels[gallery], training=training),
            features[queries], labels[queries])


def assert_initial_cosine_ranking(indices: np.ndarray, queries: np.ndarray,
                                  gallery: np.ndarray, k: int) -> None:
    """The first k items are the k most similar up to float ties, in any order (SSR's to
    re-order), and the rest follow in the cosine ranking up to ties: the initial ranking sorts
    canonical cosines (float64 products rounded once to float32: U32)."""
    cosine = queries.astype(np.float64) @ gallery.astype(np.float64).T
    head = indices[:, :k]
    by_cosine = np.take_along_axis(head, np.argsort(-np.take_along_axis(cosine, head, 1),
                                                    axis=1, kind="stable"), 1)
    assert_order_matches(by_cosine, cosine, atol=U32, larger_is_better=True, min_pinned=0)
    tail = cosine.copy()
    np.put_along_axis(tail, head, -np.inf, axis=1)  # the head is not the tail's to rank
    assert_order_matches(indices[:, k:], tail, atol=U32, larger_is_better=True)


@pytest.fixture(scope="module")
def tail_state(tmp_path_factory):
    """State folder shared by the two runs below: the second loads the module the first
    trained (the same training set), instead of training it again."""
    return tmp_path_factory.mktemp("ssr_tail")


@pytest.mark.parametrize("perturbed", [False, True], ids=["original", "perturbed"])
def test_the_tail_keeps_its_order(held_out, tail_state, perturbed):
    context, queries, _ = held_out
    features = context.features
    if perturbed:  # other near-ties: the features moved by a few ulps
        features, queries = perturb_ulps(features, seed=3), perturb_ulps(queries, seed=4)
    context = GalleryContext(features, labels=context.labels, training=context.training,
                             state_dir=tail_state)
    reranker = create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    result = reranker.rerank(queries, context.size)
    assert_initial_cosine_ranking(result.indices, queries, context.features, reranker.k_used)
    assert result.details["initial"] == "cosine"
    assert "labels of classes 0-5" in result.details["trained_on"]


def test_saved_state_is_loaded_not_retrained(held_out, tmp_path, monkeypatch):
    context, queries, _ = held_out
    context = GalleryContext(context.features, labels=context.labels,
                             training=context.training, state_dir=tmp_path)
    first = create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    saved = list((tmp_path / "ssr").glob("*.json"))
    assert len(saved) == 1
    manifest = json.loads(saved[0].read_text())
    assert manifest["k"] == QUICK["k"] and manifest["hidden"] == QUICK["hidden"]
    assert manifest["training_items"] == context.training.size
    import engine.rerank.ssr as ssr_module

    def refuse(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(ssr_module, "train_refiner", refuse)
    second = create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    np.testing.assert_array_equal(first.rerank(queries, 30).indices,
                                  second.rerank(queries, 30).indices)
    # Other training features: the saved model is not used (here: the refusal proves a retrain).
    other = TrainingSet(context.training.features[::-1].copy(), context.training.labels[::-1],
                        "reversed")
    with pytest.raises(AssertionError, match="retrained"):
        create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(GalleryContext(
            context.features, training=other, state_dir=tmp_path))


def test_a_manifest_of_other_features_means_retraining(held_out, tmp_path):
    context, _, _ = held_out
    context = GalleryContext(context.features, training=context.training, state_dir=tmp_path)
    create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    manifest_path = next((tmp_path / "ssr").glob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["features_fingerprint"] = "someone-else"
    manifest_path.write_text(json.dumps(manifest))
    retrained = create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    assert retrained.manifest["features_fingerprint"] == context.training.fingerprint
    assert json.loads(manifest_path.read_text())["features_fingerprint"] != "someone-else"


def test_two_steps_continue_the_one_step_model(held_out, tmp_path):
    context, _, _ = held_out
    context = GalleryContext(context.features, training=context.training, state_dir=tmp_path)
    reranker = create_reranker("ssr", device="cpu", train_classes=6, q_steps=2, **QUICK)
    reranker.fit(context)
    steps = sorted(json.loads(p.read_text())["q_steps"] for p in (tmp_path / "ssr").glob("*.json"))
    assert steps == [1, 2]
    assert reranker.manifest["log"]["episodes"] == QUICK["episodes"] // 6


def test_without_labels_it_learns_from_pseudo_labels(held_out):
    context, queries, _ = held_out
    reranker = create_reranker("ssr", device="cpu", **QUICK).fit(context)
    assert "pseudo-labels" in reranker.manifest["mode"]
    assert "without labels" in reranker.rerank(queries[:1], 5).details["trained_on"]


def test_labels_asked_of_an_unlabelled_gallery(demo_features):
    with pytest.raises(InvalidInputError, match="train_classes=0"):
        create_reranker("ssr", device="cpu", train_classes=3, **QUICK).fit(
            demo_features.features[:200])


def test_after_k_reciprocal_refines_its_top_k_with_the_cosine_trained_module(
        held_out, tmp_path, monkeypatch):
    """The authors' combination: the module trained on cosine lists re-orders the top-k of
    k-reciprocal re-ranking (with the given k1, k2, lambda); the tail keeps that order."""
    import engine.rerank.ssr as ssr_module

    context, queries, _ = held_out
    context = GalleryContext(context.features, labels=context.labels,
                             training=context.training, state_dir=tmp_path)
    plain = create_reranker("ssr", device="cpu", train_classes=6, **QUICK).fit(context)
    monkeypatch.setattr(ssr_module, "train_refiner", lambda *a, **k: pytest.fail("retrained"))
    k_reciprocal = create_reranker("k_reciprocal", k1=10, k2=3, lambda_value=0.5).fit(
        context.features)
    initial = k_reciprocal.rerank(queries, context.size).indices
    reranker = create_reranker("ssr", device="cpu", train_classes=6, after_k_reciprocal=True,
                               k1=10, k2=3, lambda_value=0.5, **QUICK).fit(context)
    result = reranker.rerank(queries, context.size)
    k = reranker.k_used
    np.testing.assert_array_equal(result.indices[:, k:], initial[:, k:])
    for row in range(len(queries)):
        assert set(result.indices[row, :k]) == set(initial[row, :k])
    assert result.details["initial"] == "k-reciprocal (10, 3, 0.5)"
    query = torch.from_numpy(queries)
    database = torch.from_numpy(context.features[initial[:, :k]])
    with torch.no_grad():
        expected = plain.model(query, database).numpy()
    # the head in the module's order up to float ties: two float32 runs of its refined
    # cosines (a normalisation and a dot product of dim terms: (2 dim + 4) U32 each)
    refined = np.full((len(queries), context.size), -np.inf)
    np.put_along_axis(refined, initial[:, :k], expected, axis=1)
    assert_order_matches(result.indices[:, :k], refined, larger_is_better=True,
                         atol=2 * (2 * queries.shape[1] + 4) * U32)


def test_refinement_helps_held_out_classes(held_out):
    """Trained with labels on other classes, SSR improves mAP on the held-out ones."""
    from engine.metrics import evaluate

    context, queries, query_labels = held_out
    reranker = create_reranker("ssr", device="cpu", train_classes=6, k=40, hidden=64,
                               episodes=600).fit(context)
    result = reranker.rerank(queries, context.size)
    cosine = np.argsort(-(queries @ context.features.T), axis=1, kind="stable")
    assert not np.array_equal(result.indices, cosine)
    before = evaluate(cosine, query_labels, context.labels).map
    after = evaluate(result.indices, query_labels, context.labels).map
    assert after > before


def test_refined_similarities_are_cosines_of_unit_features():
    model = SubgraphRefiner(k=3, q_steps=1, lr_dni=0.0, hidden=8).eval()
    query, database = torch.randn(2, 5), torch.randn(2, 3, 5)
    expected = torch.einsum("bd,bkd->bk", F.normalize(query, dim=-1),
                            F.normalize(database, dim=-1))
    torch.testing.assert_close(model(query, database), expected)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_cosine_ranking_in_torch_equals_numpy(demo_features, exclude_self, monkeypatch):
    """The initial ranking the GPU path computes in torch is the CPU path's, ties included
    (duplicated rows make exact ties), also across row blocks."""
    import engine.rerank.ssr as ssr_module

    monkeypatch.setattr(ssr_module, "INITIAL_CHUNK", 7)
    gallery = np.concatenate([demo_features.features[:40], demo_features.features[:5]])
    queries = gallery if exclude_self else demo_features.features[40:60]
    on_numpy = cosine_ranking(queries, gallery, 20, exclude_self)
    on_torch = cosine_ranking(queries, gallery, 20, exclude_self,
                              gallery_tensor=torch.from_numpy(gallery))
    np.testing.assert_array_equal(on_torch[0], on_numpy[0])
    np.testing.assert_allclose(on_torch[1], on_numpy[1], atol=1e-6)
    if exclude_self:
        assert not (on_numpy[0] == np.arange(len(gallery))[:, None]).any()


def test_training_reports_progress_every_percent_and_the_last_episode(monkeypatch):
    """A job's line reads "SSR (...): training episode 1230/3000, 41%, about 3 min left" (its
    title, then this message): a report every 1 % of the episodes (at least every 50), each
    with the fraction done, and one for the last episode whatever the step."""
    import engine.rerank.ssr as ssr_module

    assert [ssr_module.progress_interval(n) for n in (1, 30, 250, 1000, 3000, 200000)] == [
        1, 1, 2, 10, 30, 50]
    monkeypatch.setattr(ssr_module, "progress_interval", lambda episodes: 7)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20)
    features = unit(rng.normal(size=(4, 16))[labels] + rng.normal(size=(80, 16)))
    reports = []
    ssr_module.train_refiner(features, labels, k=12, q_steps=1, lr_dni=1e-2,
                             hidden=16, episodes=30, seed=0, device=torch.device("cpu"),
                             progress=lambda fraction, message: reports.append((fraction, message)))
    assert reports == [(n / 30, f"training episode {n}/30") for n in (7, 14, 21, 28, 30)]
