"""Asymmetric retrieval: SSP's small query model against a gallery embedded by the large
backbone.

SSP, structure similarity preservation (Wu, Wang, Zhou, Li; arXiv 2403.00648), is not a
re-ranker: it trains a light query encoder whose features live in the space of a frozen, larger
gallery encoder, so a phone-sized model can query a gallery indexed with the big one.

1. Anchors (`anchors`): a product quantiser (M subspaces x K = 256 centroids) is trained with
   faiss on the gallery model's features of the training images; each centroid sub-vector is
   L2-normalised and frozen.
2. Loss (`losses`, label-free): for each subspace m, with g_m and q_m the L2-normalised
   sub-vectors of the gallery and query features, KL(softmax(<g_m, c>/t) || softmax(<q_m, c>/t))
   over the K anchors, t = 0.1, averaged over the batch and the subspaces, in float32.
3. Query model (`network`): `tf_efficientnet_lite0` trunk -> GeM (p = 3, fixed) -> L2 -> Linear
   to the gallery dimension -> L2 (the authors' head; lite0's conv_head already gives 1280
   channels).
4. The linear head (`heads`) starts as the orthogonal Procrustes map from the query model's
   pooled features of the training images to their gallery features (closed form; a rotation
   keeps the geometry of images unlike the training ones far better than a least-squares map).
5. Training (`training`): SGD Nesterov, linear warm-up then cosine; "cached" on the CPU (frozen
   early stages, cached activations), "full" on the GPU (every layer, bf16 autocast). The
   default `SSPConfig` (`config`) is the CPU recipe: M = 4 subspaces, the last block stage +
   conv_head + head trained for 20 epochs at lr 0.05 (batch 64, 2 warm-up epochs) on 2 cached
   views per image (the evaluation view and one augmented), BatchNorm statistics frozen.

It avoids three pitfalls of the authors' code (docs/methods/ssp.md): a subspace count
hard-coded apart from the PQ's, centroids that are never assigned, and fp16 logits in the loss.

`QueryModel` and `fit_or_load` (`model`) train, embed and reuse the model; its state
(`persistence`) is saved and loaded instead of retraining, and any mismatch retrains.
`maps` holds SSP's closed-form baselines as query models of their own (`MappedQueryModel`,
`fit_or_load_map`): lite0's features mapped by the Procrustes rotation or the ridge map of
`heads`, fitted on the same training images, saved beside SSP's state. `query_models` is the
page's table of query models. Names load on first use, so importing the
package (or its query-model table) does not import torch.
"""

from __future__ import annotations

from engine.core.lazy import lazy_names

_PUBLIC: dict[str, str] = {
    "GALLERY_BACKBONE": "engine.asymmetric.config",
    "QUERY_BACKBONE": "engine.asymmetric.config",
    "SSPConfig": "engine.asymmetric.config",
    "QueryModel": "engine.asymmetric.model",
    "fit_or_load": "engine.asymmetric.model",
    "apply_ridge": "engine.asymmetric.heads",
    "fit_procrustes": "engine.asymmetric.heads",
    "fit_ridge": "engine.asymmetric.heads",
    "MappedQueryModel": "engine.asymmetric.maps",
    "fit_or_load_map": "engine.asymmetric.maps",
    "DEFAULT_QUERY_MODEL": "engine.asymmetric.query_models",
    "QUERY_MODELS": "engine.asymmetric.query_models",
    "QueryModelChoice": "engine.asymmetric.query_models",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = lazy_names(__name__, globals(), _PUBLIC)
