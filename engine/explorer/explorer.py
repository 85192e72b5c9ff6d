"""`Explorer`: what the explorer holds for the whole process: the backbone and every open
gallery (the demo, folders on the server, uploaded zips), by key; queries run through it.

Everything here is loaded once and shared by every request. No UI code: the page, `launch.py`
and tests use the same objects.

Long work a user asks for and waits on (opening a new folder or zip, building the lite2 or SSP
query model) is planned first (`plan_gallery`, `plan_query_model`: what it will do and about
how long, measured here) and then runs as a job of `requests`, a queue of its own, so that it
never waits behind background training and queries keep working meanwhile; the page shows the
job's one-line state and may cancel it (`JobQueue.cancel`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.asymmetric.query_models import QUERY_MODELS
from engine.core.jobs import Job, JobProgress, JobQueue
from engine.core.plans import Plan, PlanStep
from engine.core.storage import atomic_path, fingerprint, sha256_file
from engine.core.types import check_features
from engine.errors import InvalidInputError, UnknownNameError
from engine.evaluation.revisited import (
    GROUND_TRUTH_FORMATS,
    ground_truth_for,
    load_revisitop_gnd,
)
from engine.explorer.results import (
    BASELINE,
    BASELINE_TITLE,
    DEFAULT_TOP_N,
    QueryResult,
    Ranking,
)
from engine.explorer.session import GallerySession, QuerySet
from engine.features.backbone import FeatureExtractor, get_extractor
from engine.rerank import list_rerankers, shared_graph_depth
from engine.search.archive import (
    extract_zip,
    read_upload_name,
    resolve_allowed_folder,
    write_upload_name,
)
from engine.search.features_file import FEATURE_FILE_FORMATS, load_query_features
from engine.search.gallery import (
    DEFAULT_KNN_DEPTH,
    DEMO_GALLERY,
    Gallery,
    GalleryScan,
    ProgressCallback,
    default_cache_root,
    gallery_cache_dir,
    scan_gallery,
)

logger = logging.getLogger(__name__)


class Explorer:
    """The backbone and every open gallery of the process.

    allowed_roots: folders under which `open_folder` may open galleries (server paths typed in
    the page); uploaded zips are extracted under the cache root.
    jobs: where slow work runs (see `GallerySession.schedule`); None computes it on first use.
    requests: where work a user asked for and waits on runs (`request`), one job at a time
        beside `jobs` (default: a queue of its own when there is `jobs`, else None).
    """

    def __init__(self, extractor: FeatureExtractor, *, device: str = "auto",
                 cache_root: str | os.PathLike | None = None,
                 allowed_roots: Sequence[str | os.PathLike] | None = None,
                 methods: Sequence[str] | None = None, ssp_config: Any = None,
                 jobs: JobQueue | None = None, requests: JobQueue | None = None) -> None:
        self.extractor = extractor
        self.jobs = jobs
        self.requests = requests if requests is not None else (
            JobQueue() if jobs is not None else None)
        self.device = device
        self.ssp_config = ssp_config
        """SSPConfig of the asymmetric query model (None: the engine's default recipe)."""
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        self.allowed_roots = [Path(root).expanduser().resolve() for root in (
            allowed_roots if allowed_roots is not None else default_allowed_roots())]
        self.method_names = methods
        self.knn_depth = max(DEFAULT_KNN_DEPTH, shared_graph_depth(
            list_rerankers() if methods is None else methods))
        """Depth of every gallery's shared kNN graph: what the methods' defaults read, so that
        none searches a large gallery itself."""
        self.galleries: dict[str, GallerySession] = {}
        self._lock = threading.Lock()
        self._variant_locks: dict[str, threading.Lock] = {}
        self._open_locks: dict[Path, threading.Lock] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike | None = DEMO_GALLERY, *, device: str = "auto",
             cache_root: str | os.PathLike | None = None,
             progress: ProgressCallback | None = None,
             allowed_roots: Sequence[str | os.PathLike] | None = None,
             methods: Sequence[str] | None = None, jobs: JobQueue | None = None,
             requests: JobQueue | None = None, features: str | os.PathLike | None = None,
             features_images: str | os.PathLike | None = None,
             features_queries: str | os.PathLike | None = None,
             ground_truth: str | os.PathLike | None = None) -> Explorer:
        """The explorer with its first gallery open (indexed, or loaded from its cache; with
        `jobs`, the rest of its preparation queued there). With `features`, the first gallery
        is that features file (`open_features`, thumbnails from `features_images`, query
        features from `features_queries` scored by `ground_truth`), and the folder, when not
        None, opens after it."""
        if (features_queries is not None or ground_truth is not None) and features is None:
            raise InvalidInputError("query features and ground truth go with a features file "
                                    "(features=...)")
        explorer = cls(get_extractor(device=device), device=device, cache_root=cache_root,
                       allowed_roots=allowed_roots, methods=methods, jobs=jobs,
                       requests=requests)
        if features is not None:
            explorer.open_features(features, images=features_images, progress=progress,
                                   check_allowed=False, queries=features_queries,
                                   ground_truth=ground_truth)
        if folder is not None:
            explorer.open_folder(folder, progress=progress, check_allowed=False)
        elif features is None:
            raise InvalidInputError("give a gallery folder or a features file")
        return explorer

    @property
    def thumbnail_root(self) -> Path:
        return self.cache_root / "thumbnails"

    @property
    def upload_root(self) -> Path:
        return self.cache_root / "uploads"

    @property
    def default_key(self) -> str:
        return next(iter(self.galleries))

    def choices(self) -> list[tuple[str, str]]:
        """(title, key) of every open gallery, in the order they were opened."""
        # a copy: galleries open and close in other threads
        return [(session.title, key) for key, session in list(self.galleries.items())]

    def session(self, key: str | None) -> GallerySession:
        """An open gallery by key (the first one when key is empty)."""
        if not key:
            return self.galleries[self.default_key]
        try:
            return self.galleries[key]
        except KeyError:
            raise UnknownNameError(f"no open gallery {key!r}; open it again") from None

    def with_query_model(self, key: str | None, query_model: str, *,
                         progress: ProgressCallback | None = None) -> GallerySession:
        """The gallery of `key` as `query_model` sees it (see `QUERY_MODELS`).

        "lite0" is the gallery as opened. "lite2" indexes the same folder with lite2 (once,
        cached like any gallery) and embeds queries with lite2. "ssp" searches that lite2 index
        with queries embedded by the SSP query model, trained on the gallery's images (labels
        unused) on first use and saved beside the lite2 gallery cache. "procrustes" and "ridge"
        search it with lite0's features mapped by a closed-form map fitted in seconds on the
        same images (`engine.asymmetric.maps`; saved there too). Re-rankers are fitted here
        too, so the page's progress bar covers all the waiting. The new session joins the
        gallery choices; an asymmetric one's Compare table gets a row per query model
        (`query_model_rows`).
        """
        spec = _query_model(query_model)
        base = self.session(self.session(key).base_key)
        if spec.gallery_backbone is None:
            return base
        _check_embeddable(base, f"the {spec.title} query model")
        variant_key = f"{base.key}@{query_model}"
        with self._lock:
            gate = self._variant_locks.setdefault(variant_key, threading.Lock())
        with gate:
            if variant_key in self.galleries:
                return self.galleries[variant_key]
            gallery_extractor = get_extractor(spec.gallery_backbone, device=self.device)
            gallery = Gallery.open(base.gallery.root, extractor=gallery_extractor,
                                   cache_root=self.cache_root, progress=progress,
                                   device=self.device, knn_depth=self.knn_depth)
            session = GallerySession(variant_key, gallery, self.device, self.method_names,
                                     query_model=query_model, base_key=base.key,
                                     jobs=self.jobs, name=base.name)
            if spec.closed_form is not None:
                from engine.asymmetric import fit_or_load_map

                extractor = self._map_extractor()
                session.query_encoder = fit_or_load_map(
                    spec.closed_form, self._query_side_features(base, gallery, extractor,
                                                                progress),
                    gallery.features, gallery.state_dir, query_meta=extractor.meta,
                    gallery_meta=gallery.meta, extractor=extractor, progress=progress)
            elif spec.asymmetric:
                from engine.asymmetric import fit_or_load

                session.query_encoder = fit_or_load(
                    [gallery.path_of(row) for row in range(gallery.size)], gallery.state_dir,
                    gallery_features=gallery.features, gallery_meta=gallery.meta,
                    config=self.ssp_config, device=self.device, progress=progress)
            if spec.asymmetric:
                session.query_model_rows = functools.partial(self.query_model_rows, session)
            self._prepare(session, progress)
            with self._lock:
                self.galleries[variant_key] = session
            if spec.asymmetric and self.jobs is not None and gallery.labels is not None:
                self.jobs.submit((session.key, "scores", "query models"),
                                 "Query-model scores",
                                 lambda job: self.query_model_rows(session, True, job))
            return session

    def _map_extractor(self) -> FeatureExtractor:
        """The query backbone of the closed-form query maps: SSP's (same trunk and weights)."""
        from engine.asymmetric import SSPConfig

        config = self.ssp_config or SSPConfig()
        return get_extractor(config.query_backbone, config.query_weights, device=self.device)

    def _query_side_features(self, base: GallerySession, gallery: Gallery,
                             extractor: FeatureExtractor,
                             progress: ProgressCallback | None = None) -> np.ndarray:
        """`extractor`'s features of `gallery`'s images, in its row order: the opened gallery's
        when that backbone embedded it (lite0, the usual case), else the folder indexed with it
        (cached like any gallery)."""
        source = base.gallery
        if source.meta.fingerprint != extractor.meta.fingerprint:
            source = Gallery.open(source.root, extractor=extractor, cache_root=self.cache_root,
                                  progress=progress, device=self.device,
                                  knn_depth=self.knn_depth)
        positions = {name: row for row, name in enumerate(source.files)}
        missing = [name for name in gallery.files if name not in positions]
        if missing:
            raise InvalidInputError(f"{len(missing)} images of {gallery.root.name} were not "
                                    f"embedded by {extractor.meta.backbone} (e.g. {missing[0]});"
                                    " open the gallery again")
        return np.asarray(source.features[[positions[name] for name in gallery.files]],
                          np.float32)

    def query_model_rows(self, session: GallerySession, compute: bool = False,
                         progress: ProgressCallback | None = None) -> list[Any]:
        """The Compare table's rows of every query model's search (the baseline, no
        re-ranking) on the gallery of `session` (a lite2 gallery): symmetric lite0 (the opened
        gallery's own baseline), symmetric lite2, and each asymmetric query model built here,
        its queries the gallery's images embedded by it, each against the others
        (`engine.asymmetric.compare`). Cached ones, or all of them computed now with
        `compute`; each titled "Baseline, queries by <query model>"."""
        from engine.asymmetric import MappedQueryModel
        from engine.asymmetric.compare import query_model_scores

        base = self.session(session.base_key)
        found = []
        for number, (name, spec) in enumerate(QUERY_MODELS.items()):
            label = f"{BASELINE_TITLE}, queries by {spec.title}"
            if progress is not None and compute:
                progress(number / len(QUERY_MODELS), f"scoring {label}")
            if not spec.asymmetric:
                owner = (base if spec.gallery_backbone is None
                         else session if spec.gallery_backbone == session.gallery.meta.backbone
                         else self.galleries.get(f"{base.key}@{name}"))
                scores = None if owner is None else owner.scores(BASELINE,
                                                                 cached_only=not compute)
            else:
                variant = self.galleries.get(f"{base.key}@{name}")
                encoder = None if variant is None else variant.query_encoder
                if encoder is None or variant.gallery.fingerprint != session.gallery.fingerprint:
                    continue
                shown = encoder.shown_params if isinstance(encoder, MappedQueryModel) else {}
                scores = query_model_scores(
                    session.gallery, label, {"state": encoder.fingerprint, **shown},
                    functools.partial(self._gallery_queries, base, variant),
                    depth=session.depth(leave_one_out=True),
                    rows=None if session.full_rankings else session.score_sample,
                    timing_depth=DEFAULT_TOP_N, cached_only=not compute)
            if scores is not None:
                found.append(dataclasses.replace(scores, method=label))
        return found

    def _gallery_queries(self, base: GallerySession, variant: GallerySession,
                         rows: np.ndarray) -> np.ndarray:
        """The gallery images of `rows` embedded by the variant's asymmetric query model: SSP
        embeds the images; a closed-form map maps their lite0 features."""
        from engine.asymmetric import MappedQueryModel

        encoder = variant.query_encoder
        gallery = variant.gallery
        if isinstance(encoder, MappedQueryModel):
            return encoder.map(self._query_side_features(base, gallery, encoder.extractor)[rows])
        return encoder.embed([gallery.path_of(int(row)) for row in rows])

    def embed_query(self, session: GallerySession, image: Any
                    ) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """The query's feature in the session's gallery space, and ImageNet top-3 of the
        backbone that embedded it (none for the SSP query model, which has no classifier; a
        closed-form map's are its lite0's)."""
        from engine.asymmetric import MappedQueryModel

        encoder = session.query_encoder
        if isinstance(encoder, MappedQueryModel):
            feature, imagenet = encoder.extractor.embed_and_classify(image)
            return encoder.map(feature)[0], imagenet
        if encoder is not None:
            return session.query_encoder.embed([image])[0], []
        backbone = QUERY_MODELS[session.query_model].gallery_backbone
        extractor = (self.extractor if backbone is None
                     else get_extractor(backbone, device=self.device))
        return extractor.embed_and_classify(image)

    def open_folder(self, folder: str | os.PathLike, *, progress: ProgressCallback | None = None,
                    check_allowed: bool = True, name: str | None = None) -> GallerySession:
        """Open (index, or load from cache) a gallery folder; reopening is instant.

        With `check_allowed`, the folder must lie inside one of `allowed_roots`. `name` is what
        the page calls it (default: an upload's recorded file name, else the folder's name).
        """
        root = self._gallery_root(folder, check_allowed)
        name = name or read_upload_name(root)
        with self._lock:
            gate = self._open_locks.setdefault(root, threading.Lock())
        with gate:
            for session in self.galleries.values():
                if (session.gallery.root == root and session.key == session.base_key
                        and session.gallery.source is None):
                    session.name = name or session.name
                    return session
            gallery = Gallery.open(root, extractor=self.extractor, cache_root=self.cache_root,
                                   progress=progress, device=self.device,
                                   knn_depth=self.knn_depth)
            key = gallery.cache_dir.name
            session = GallerySession(key, gallery, self.device, self.method_names,
                                     jobs=self.jobs, name=name)
            self._prepare(session, progress)
            with self._lock:
                self.galleries[key] = session
            logger.info("opened gallery %s: %d images, %d classes, %d skipped", root,
                        gallery.size, len(gallery.class_names), len(gallery.skipped))
            return session

    def open_features(self, path: str | os.PathLike, *, images: str | os.PathLike | None = None,
                      names: Sequence[str] | None = None,
                      labels: Sequence[int] | np.ndarray | None = None, metric: str = "cosine",
                      normalize: str = "warn", progress: ProgressCallback | None = None,
                      check_allowed: bool = True, name: str | None = None,
                      queries: str | os.PathLike | None = None,
                      ground_truth: str | os.PathLike | None = None) -> GallerySession:
        """Open a gallery from a features file (`Gallery.open_features`), titled by the file's
        name (or `name`). With `check_allowed`, the file, the image folder and the query and
        ground-truth files must lie inside one of `allowed_roots`. Its queries are its own
        items or query features: an image cannot be embedded into another model's feature
        space (`query`).

        `queries`: a features file of query vectors (a query/gallery split), checked as the
        gallery's (`load_query_features`: the same dimension, `metric` and `normalize`) and
        kept on the session (`GallerySession.query_set`, `query_from_set`). `ground_truth`: a
        revisited Oxford/Paris ground-truth file (gnd_roxford5k.pkl style) for those queries,
        matched by name; the Compare table is then the revisited one. They are checked before
        the session is made or changed: a bad file raises InvalidInputError and leaves an
        open session as it was (the gallery's index cache is kept either way).
        """
        if ground_truth is not None and queries is None:
            raise InvalidInputError("a ground-truth file needs query features (queries=...): "
                                    "it scores their rankings")
        source = Path(path).expanduser().resolve()
        if check_allowed:
            resolve_allowed_folder(source.parent, self.allowed_roots)
            if images is not None:
                images = resolve_allowed_folder(images, self.allowed_roots)
            self._check_allowed_files(queries, ground_truth)
        with self._lock:
            gate = self._open_locks.setdefault(source, threading.Lock())
        with gate:
            gallery = Gallery.open_features(source, names=names, labels=labels, images=images,
                                            metric=metric, normalize=normalize,
                                            cache_root=self.cache_root, device=self.device,
                                            knn_depth=self.knn_depth)
            key = gallery.cache_dir.name
            query_set = None if queries is None else load_query_set(
                gallery, queries, ground_truth, metric=metric, normalize=normalize)
            known = self.galleries.get(key)
            if known is not None and known.gallery.fingerprint == gallery.fingerprint:
                known.name = name or known.name
                if query_set is not None:
                    known.attach_queries(query_set)
                return known
            session = GallerySession(key, gallery, self.device, self.method_names,
                                     jobs=self.jobs, name=name or source.name)
            self._prepare(session, progress)
            if query_set is not None:
                session.attach_queries(query_set)
            with self._lock:
                self.galleries[key] = session
            logger.info("opened features gallery %s: %d items, %d classes", source,
                        gallery.size, len(gallery.class_names))
            return session

    def _check_allowed_files(self, *paths: str | os.PathLike | None) -> None:
        """Raise UnsafePathError unless each given file lies inside one of `allowed_roots`."""
        for path in paths:
            if path is not None:
                resolve_allowed_folder(Path(path).expanduser().resolve().parent,
                                       self.allowed_roots)

    def _gallery_root(self, folder: str | os.PathLike, check_allowed: bool) -> Path:
        if check_allowed:
            return resolve_allowed_folder(folder, self.allowed_roots)
        return Path(folder).expanduser().resolve()

    # -- planned work a user waits on ------------------------------------------------------------
    def plan_gallery(self, folder: str | os.PathLike, *, check_allowed: bool = True) -> Plan:
        """What `open_folder(folder)` will do and about how long: indexing the images not in
        its cache with the explorer's backbone (empty when it is open or cached: opening is
        then a matter of seconds). Reads the folder and the feature cache, embeds nothing."""
        root = self._gallery_root(folder, check_allowed)
        if any(session.gallery.root == root and session.key == session.base_key
               and session.gallery.source is None for session in list(self.galleries.values())):
            return Plan()
        scan = scan_gallery(root, self.extractor.meta, self.cache_root)
        return Plan.of(self._indexing_step(scan, self.extractor, self._gallery_name(root)))

    def plan_query_model(self, key: str | None, query_model: str) -> Plan:
        """What `with_query_model(key, query_model)` will do and about how long: indexing the
        gallery's images with the gallery model (those not cached) and, for SSP, training the
        query model (unless saved). Empty when the variant is open or fully cached."""
        spec = _query_model(query_model)
        base = self.session(self.session(key).base_key)
        if spec.gallery_backbone is None or f"{base.key}@{query_model}" in self.galleries:
            return Plan()
        _check_embeddable(base, f"the {spec.title} query model")
        extractor = get_extractor(spec.gallery_backbone, device=self.device)
        root = base.gallery.root
        scan = scan_gallery(root, extractor.meta, self.cache_root)
        plan = Plan.of(self._indexing_step(scan, extractor, self._gallery_name(root)))
        if spec.closed_form is not None:
            plan = plan.then(Plan.of(*self._map_steps(spec.closed_form, base, scan, extractor)))
        elif spec.asymmetric:
            plan = plan.then(Plan.of(self._ssp_step(scan, extractor)))
        return plan

    def _map_steps(self, kind: str, base: GallerySession, scan: GalleryScan,
                   gallery_extractor: FeatureExtractor) -> list[PlanStep | None]:
        """Fitting a closed-form query map (seconds), unless it is saved; indexing the folder
        with the query backbone first when the opened gallery was not."""
        from engine.asymmetric.maps import MAP_KINDS, estimate_fit_seconds, saved_map_path

        extractor = self._map_extractor()
        meta = gallery_extractor.meta
        steps: list[PlanStep | None] = []
        query_features = base.gallery.features
        if base.gallery.meta.fingerprint != extractor.meta.fingerprint:
            query_scan = scan_gallery(scan.root, extractor.meta, self.cache_root)
            steps.append(self._indexing_step(query_scan, extractor,
                                             self._gallery_name(scan.root)))
            query_features = query_scan.features
        if (scan.features is not None and query_features is not None
                and len(scan.features) == len(query_features) > 0):
            state_dir = gallery_cache_dir(scan.root, meta, self.cache_root) / "state"
            saved = saved_map_path(kind, query_features, scan.features, state_dir,
                                   extractor.meta, meta)
            if saved.with_suffix(".json").is_file():
                return steps
        n_images = scan.files if scan.features is None else len(scan.features)
        steps.append(PlanStep(f"fits the {MAP_KINDS[kind]} query map",
                              estimate_fit_seconds(kind, n_images, int(extractor.meta.dim),
                                                   int(meta.dim))))
        return steps

    def _gallery_name(self, root: Path) -> str:
        if root == DEMO_GALLERY.resolve():
            return "Oxford-17 demo"
        return read_upload_name(root) or root.name

    def _indexing_step(self, scan: GalleryScan, extractor: FeatureExtractor, name: str
                       ) -> PlanStep | None:
        """Embedding the scan's images not cached yet: the model's measured time an image
        (`FeatureExtractor.seconds_per_image`) plus decoding, timed on a few of the folder's
        files and shared by the extractor's decoding threads."""
        if scan.to_embed == 0:
            return None
        per_image = extractor.seconds_per_image(self.cache_root) + extractor.preparation_seconds(
            scan.samples) / extractor.workers
        plural = "" if scan.to_embed == 1 else "s"
        what = (f"the {scan.to_embed:,} image{plural}" if scan.to_embed == scan.files
                else f"{scan.to_embed:,} new image{plural} (of {scan.files:,})")
        return PlanStep(f"indexes {what} of {name} with {extractor.meta.backbone}",
                        scan.to_embed * per_image)

    def _ssp_step(self, scan: GalleryScan, gallery_extractor: FeatureExtractor
                  ) -> PlanStep | None:
        """Training the SSP query model on the gallery's images, unless it is saved."""
        from engine.asymmetric import SSPConfig
        from engine.asymmetric.model import estimate_training_seconds, saved_model_path

        config = self.ssp_config or SSPConfig()
        meta = gallery_extractor.meta
        n_images = scan.files if scan.features is None else len(scan.features)
        if n_images < config.centroids:
            raise InvalidInputError(f"SSP's anchors need at least {config.centroids} training "
                                    f"images (one per PQ centroid); this gallery has {n_images}")
        if scan.features is not None:
            state_dir = gallery_cache_dir(scan.root, meta, self.cache_root) / "state"
            saved = saved_model_path(scan.features, state_dir, meta, config)
            if saved.with_suffix(".json").is_file():
                return None
        prepare = gallery_extractor.preparation_seconds(scan.samples[:2])
        seconds = estimate_training_seconds(n_images, meta, config, self.device, prepare)
        return PlanStep("trains the SSP query model", seconds)

    def request(self, key: Hashable, title: str, plan: Plan,
                work: Callable[[JobProgress], Any]) -> Job:
        """Run `work` as a job of `requests` (work a user asked for and waits on), carrying
        its `plan`; a known key returns its job (a cancelled or failed one is queued again)."""
        if self.requests is None:
            raise InvalidInputError("this explorer has no request queue")
        return self.requests.submit(key, title, work, plan=plan, retry=True)

    def request_gallery(self, folder: str | os.PathLike, *, check_allowed: bool = True) -> Job:
        """Open a gallery folder as a request (`request`, with `plan_gallery`'s plan); the
        finished job's `result` is its `GallerySession`."""
        root = self._gallery_root(folder, check_allowed)
        return self.request(("gallery", str(root)), f"Gallery {self._gallery_name(root)}",
                            self.plan_gallery(root, check_allowed=False),
                            lambda progress: self.open_folder(root, progress=progress,
                                                              check_allowed=False))

    def request_query_model(self, key: str | None, query_model: str) -> Job:
        """Build the gallery of `key` as `query_model` sees it as a request (`request`); the
        finished job's `result` is the new `GallerySession`."""
        spec = _query_model(query_model)
        base = self.session(self.session(key).base_key)
        return self.request(("query model", base.key, query_model),
                            f"Query model {spec.title}", self.plan_query_model(base.key,
                                                                                query_model),
                            lambda progress: self.with_query_model(base.key, query_model,
                                                                   progress=progress))

    def _prepare(self, session: GallerySession, progress: ProgressCallback | None) -> None:
        """Fit a new session's methods now, or, with a job queue, queue all its preparation."""
        if self.jobs is None:
            session.fit_defaults(progress)
        else:
            session.schedule()

    def prepare_query_model(self, key: str | None, query_model: str) -> None:
        """Queue `with_query_model` (indexing with the gallery model, training SSP) as a
        background job; its session's own preparation is queued when it opens."""
        if self.jobs is None:
            raise InvalidInputError("this explorer has no background job queue")
        base = self.session(key)
        self.jobs.submit((base.key, "query model", query_model),
                         f"Query model {QUERY_MODELS[query_model].title}",
                         lambda progress: self.with_query_model(base.key, query_model,
                                                                progress=progress))

    def open_zip(self, archive: str | os.PathLike, *, name: str | None = None,
                 progress: ProgressCallback | None = None) -> GallerySession:
        """Extract an uploaded zip (safely, content-addressed) and open it as a gallery, called
        `name` (default: the archive's file name, which Gradio keeps for an upload). The name
        is kept beside the extraction, so that a reopened upload keeps it."""
        root = self.extract_upload(archive, name=name)
        return self.open_folder(root, progress=progress, check_allowed=False)

    def extract_upload(self, archive: str | os.PathLike, *, name: str | None = None) -> Path:
        """Extract an uploaded zip under `upload_root` (reusing an earlier extraction of the
        same bytes) and record its `name` (default: the archive's file name) beside it; returns
        the gallery folder, for `plan_gallery` and `request_gallery` (check_allowed=False)."""
        extracted = extract_zip(archive, self.upload_root)
        for entry, reason in extracted.skipped.items():
            logger.info("zip entry %s not extracted: %s", entry, reason)
        write_upload_name(extracted.root, name or Path(archive).name)
        return extracted.root

    def keep_upload(self, path: str | os.PathLike, kind: str, suffixes: Collection[str], *,
                    what: str, name: str | None = None) -> Path:
        """Copy an uploaded file under `upload_root/<kind>/<sha256>/`, named `name` (default:
        its own name), reusing an earlier copy of the same bytes; returns the copy. Only the
        copy is opened: Gradio may delete its temporary upload at any time.

        suffixes: the name's allowed suffixes (lower case, with the dot); what: the file's role
        in messages ("features file", ...). A missing file or another suffix raises
        InvalidInputError.
        """
        source = Path(path)
        if not source.is_file():
            raise InvalidInputError(f"the uploaded {what} {source.name} is gone")
        name = Path(name or source.name).name
        if Path(name).suffix.lower() not in suffixes:
            raise InvalidInputError(f"{name}: a {what} must be one of "
                                    f"{', '.join(sorted(suffixes))}")
        folder = self.upload_root / kind / sha256_file(source)[:16]
        kept = folder / name
        if not kept.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(kept) as temporary:
                shutil.copyfile(source, temporary)
        return kept

    def keep_features_upload(self, path: str | os.PathLike, *, name: str | None = None) -> Path:
        """An uploaded features file kept under `upload_root/features/` (`keep_upload`), for
        `open_features(..., check_allowed=False)`."""
        return self.keep_upload(path, "features", FEATURE_FILE_FORMATS, what="features file",
                                name=name)

    def keep_queries_upload(self, queries: str | os.PathLike,
                            ground_truth: str | os.PathLike | None = None
                            ) -> tuple[Path, Path | None]:
        """Uploaded query features (a features file) and revisited ground truth (.pkl), kept
        under `upload_root/queries/` and `upload_root/ground-truth/` (`keep_upload`), for
        `attach_queries(..., check_allowed=False)`."""
        kept = self.keep_upload(queries, "queries", FEATURE_FILE_FORMATS,
                                what="query features file")
        truth = None if ground_truth is None else self.keep_upload(
            ground_truth, "ground-truth", GROUND_TRUTH_FORMATS, what="ground-truth file")
        return kept, truth

    def attach_queries(self, key: str | None, queries: str | os.PathLike,
                       ground_truth: str | os.PathLike | None = None, *,
                       check_allowed: bool = True, metric: str = "cosine",
                       normalize: str = "warn") -> GallerySession:
        """Give an open features gallery query features (a query/gallery split) and, when
        given, their revisited ground truth, replacing any it had (`load_query_set`, then
        `GallerySession.attach_queries`); returns the session. With `check_allowed`, the files
        must lie inside one of `allowed_roots`.

        Raises:
            InvalidInputError: a gallery opened from images (its queries are its images), or a
                bad file (`load_query_set`); the session then keeps its query set and caches.
        """
        session = self.session(key)
        if session.gallery.source is None:
            raise InvalidInputError(
                f"{session.title} was opened from images: query features go with a gallery "
                "opened from a features file (an image gallery's queries are its images)")
        if check_allowed:
            self._check_allowed_files(queries, ground_truth)
        query_set = load_query_set(session.gallery, queries, ground_truth, metric=metric,
                                   normalize=normalize)
        session.attach_queries(query_set)
        logger.info("attached %d queries from %s to %s", len(query_set.names),
                    query_set.source, session.title)
        return session

    def close(self, key: str) -> list[GallerySession]:
        """Forget an open gallery and the query-model variants opened from it (a public page
        closes a visitor's upload this way); returns them, so that the caller can delete their
        files. The first gallery, the one the page starts on, stays open. Their waiting
        background jobs are dropped and one running now is cancelled (it stops at its next
        progress report; `JobQueue.running` names it until then), as are the requests that
        build their query models."""
        with self._lock:
            if key == self.default_key:
                raise InvalidInputError("the gallery the page starts on cannot be closed")
            closed = [session for name, session in self.galleries.items()
                      if name == key or session.base_key == key]
            for session in closed:
                del self.galleries[session.key]
                self._variant_locks.pop(session.key, None)
                self._open_locks.pop(session.gallery.source or session.gallery.root, None)
        keys = {session.key for session in closed} | {key}

        def belongs(job_key: Hashable) -> bool:
            return isinstance(job_key, tuple) and job_key[0] in keys

        if self.jobs is not None:
            self.jobs.drop(belongs)
            running = self.jobs.running(belongs)
            if running is not None:
                self.jobs.cancel(running.key)
        if self.requests is not None:
            for job in self.requests.jobs():
                if isinstance(job.key, tuple) and job.key[:1] == ("query model",) and (
                        job.key[1] in keys):
                    self.requests.cancel(job.key)
        return closed

    # -- queries ---------------------------------------------------------------------------------
    def query(self, key: str | None, image: Any = None, *, source_file: str | None = None,
              query_class: str | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
              top_n: int = DEFAULT_TOP_N, leave_out: bool = True,
              query_feature: np.ndarray | None = None) -> QueryResult:
        """Embed one image and rank the gallery with the baseline and every method; each
        ranking's shown results carry their cosine similarity to the query, and the result says
        how familiar the query is to the gallery (`Familiarity`).

        Args:
            key: the gallery (empty: the first one).
            image: a path, bytes, array or PIL image; None when `source_file` is given.
            source_file: the gallery file the query is (a pick); gives the query its class.
            query_class: the class of an uploaded query, to score its rankings (optional).
            params: per method, the parameters to run (default: preset or authors' defaults).
            top_n: results shown per method; the rankings themselves go deeper (full up to
                `FULL_RANKING_LIMIT`) so that AP is over the whole ranking.
            leave_out: drop a pick's own image from its results (leave-one-out).
            query_feature: (d,) a query already in the gallery's feature space (from the model
                that made a features file), instead of an image; normalised to a unit row.
        """
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise InvalidInputError(f"the number of results must be a positive integer, got "
                                    f"{top_n!r}")
        _check_method_params(params)
        session = self.session(key)
        gallery = session.gallery
        source_row = None if source_file is None else session.position_of(source_file)
        if query_feature is not None and (image is not None or source_row is not None):
            raise InvalidInputError("give one query: an image, a gallery item or a feature")
        if image is not None and gallery.source is not None:
            raise InvalidInputError(
                "this gallery was opened from features of another model; query with one of "
                "its items or with a query feature (an image cannot be embedded into its "
                "feature space)")
        if image is None and query_feature is None:
            if source_row is None:
                raise InvalidInputError("give a query image or the name of a gallery image")
            if gallery.source is None:
                image = gallery.path_of(source_row)
        leave_out = bool(leave_out) and source_row is not None
        if gallery.size - leave_out < 1:
            raise InvalidInputError("the gallery has no other image to return")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        imagenet: list[tuple[str, float]] = []
        if query_feature is not None:
            feature = _unit_query(query_feature, gallery.meta.dim)
        elif image is not None:
            feature, imagenet = self.embed_query(session, image)
        timings["embed"] = time.perf_counter() - started
        if source_row is not None:
            if not session.asymmetric:
                # the row every method was fitted on
                feature = np.asarray(gallery.features[source_row], np.float32)
            query_label = None if gallery.labels is None else int(gallery.labels[source_row])
            query_label = None if query_label is not None and query_label < 0 else query_label
        else:
            query_label = session.label_of_class(query_class)
        n_positives = None
        if query_label is not None and gallery.labels is not None:
            n_positives = int((gallery.labels == query_label).sum()) - int(
                leave_out and source_row is not None)
        query_name = None if query_label is None else gallery.class_names[query_label]
        rankings: dict[str, Ranking] = {}
        not_ready: dict[str, str] = {}
        for method, _ in session.methods():
            setting = session.setting(method, None if params is None else params.get(method))
            reason = session.not_ready(method, setting)
            if reason is not None:
                not_ready[method] = reason
                continue
            ranking = session.rank(method, feature, source_row, leave_out, setting)
            rankings[method] = session.score(ranking, query_label, n_positives, top_n, feature)
            timings[method] = ranking.seconds
        return QueryResult(session.key, source_row, source_file, query_label, query_name,
                           n_positives, feature, imagenet, rankings, timings,
                           min(top_n, len(rankings[BASELINE].indices)), leave_out,
                           session.embedded_by, not_ready,
                           session.familiarity(feature, source_row, leave_out,
                                               int(rankings[BASELINE].indices[0])))

    def query_from_set(self, key: str | None, name: str, *,
                       params: Mapping[str, Mapping[str, Any]] | None = None,
                       top_n: int = DEFAULT_TOP_N) -> QueryResult:
        """Rank the gallery for one query of the session's query features (`query` with its
        `query_feature`), every method. With revisited ground truth each ranking carries the
        query's Medium-protocol AP (junk removed; its term in the Compare table's Medium mAP)
        and precision at `top_n`; else, when the query has a label, its class-based AP."""
        session = self.session(key)
        queries = session.query_set
        if queries is None:
            raise InvalidInputError(f"{session.title} has no query features; attach a "
                                    "queries file (the page's Open another gallery, "
                                    "launch.py --features-queries or `attach_queries`)")
        row = queries.row_of(name)
        label = None if queries.labels is None else int(queries.labels[row])
        query_class = (None if label is None or label < 0 or queries.gnd is not None
                       else session.gallery.class_names[label])
        result = dataclasses.replace(
            self.query(session.key, query_feature=queries.features[row],
                       query_class=query_class, params=params, top_n=top_n),
            query_set_name=name)
        if queries.gnd is None:
            return result
        return self.score_from_set(result, row)

    def score_from_set(self, result: QueryResult, row: int) -> QueryResult:
        """A query-set query's result with every ranking scored by the revisited ground truth
        of query `row` (Medium protocol), and its number of positives."""
        session = self.session(result.gallery_key)
        queries = session.query_set
        if queries is None or queries.gnd is None:
            return result
        entry = queries.gnd[row]
        rankings = {method: session.score_ground_truth(ranking, row, result.top_n)
                    for method, ranking in result.rankings.items()}
        return dataclasses.replace(result, rankings=rankings, query_label=None,
                                   query_class=None,
                                   n_positives=len(entry["easy"]) + len(entry["hard"]))

    def rerank(self, result: QueryResult, method: str, params: Mapping[str, Any] | None
               ) -> QueryResult:
        """The same query with one method re-run at new parameters."""
        session = self.session(result.gallery_key)
        setting = session.setting(method, params)
        reason = session.not_ready(method, setting)
        if reason is not None:
            return result.without(method, reason)
        ranking = session.rank(method, result.feature, result.source_row, result.leave_out,
                               setting)
        ranking = session.score(ranking, result.query_label, result.n_positives, result.top_n,
                                result.feature)
        row = _query_set_row(session, result)
        if row is not None and session.query_set is not None and (
                session.query_set.gnd is not None):
            ranking = session.score_ground_truth(ranking, row, result.top_n)
        return result.with_ranking(ranking)


def load_query_set(gallery: Gallery, queries: str | os.PathLike,
                   ground_truth: str | os.PathLike | None = None, *, metric: str = "cosine",
                   normalize: str = "warn") -> QuerySet:
    """Read and check query features for a gallery opened from a features file, and their
    revisited ground truth when given (matched by name, counts first: `ground_truth_for`).
    Nothing is kept or changed here: the caller attaches the result to a session.

    Raises:
        InvalidInputError: a queries file of another dimension, with NaN rows, ...; a ground
            truth of another number of queries or items, or with names that do not match.
    """
    if gallery.source is None:
        raise InvalidInputError("query features go with a gallery opened from a features "
                                "file; a folder's queries are its images")
    loaded = load_query_features(queries, dim=int(gallery.meta.dim),
                                 class_names=gallery.class_names, metric=metric,
                                 normalize=normalize, gallery_name=f"the gallery "
                                 f"{gallery.source.name}")
    features = np.ascontiguousarray(loaded.features, np.float32)
    gnd = truth_name = None
    digest = loaded.sha256
    if ground_truth is not None:
        truth = Path(ground_truth).expanduser().resolve()
        data = load_revisitop_gnd(truth)
        gnd = ground_truth_for(data, gallery.files, loaded.names, truth.name)
        truth_name, digest = truth.name, f"{digest}+{sha256_file(truth)[:16]}"
    return QuerySet(source=loaded.path.name, names=list(loaded.names), features=features,
                    labels=loaded.labels, fingerprint=fingerprint([digest, loaded.normalised]),
                    ground_truth=truth_name, gnd=gnd)


QUERY_MATCH = 1e-5
"""A query feature within this cosine distance of a query-set row is that query (the unit
division in `query` may move its last bits)."""


def _query_set_row(session: GallerySession, result: QueryResult) -> int | None:
    """The row of the session's query features that `result` queried, or None (a gallery
    item, or a feature that is none of them)."""
    queries = session.query_set
    if queries is None or result.source_row is not None:
        return None
    cosines = queries.features @ np.asarray(result.feature, np.float32)
    row = int(np.argmax(cosines))
    return row if cosines[row] >= 1.0 - QUERY_MATCH else None


def _query_model(name: str) -> Any:
    """The `QueryModelChoice` of `name`; an unknown name raises InvalidInputError."""
    if name not in QUERY_MODELS:
        raise InvalidInputError(f"no query model {name!r}; choose one of "
                                f"{', '.join(QUERY_MODELS)}")
    return QUERY_MODELS[name]


def _check_embeddable(session: GallerySession, what: str) -> None:
    """A gallery opened from features has no images for another model to embed."""
    if session.gallery.source is not None:
        raise InvalidInputError(f"{session.title} was opened from features of another model: "
                                f"{what} needs its images, which it does not embed")


def _unit_query(query_feature: Any, dim: int) -> np.ndarray:
    """A query feature as a (d,) float32 unit vector; InvalidInputError for a wrong shape,
    non-finite values or a zero vector."""
    vector = np.asarray(query_feature)
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise InvalidInputError(f"the query feature must be a ({dim},) vector like the "
                                f"gallery's rows, got shape {vector.shape}")
    vector = check_features(vector, "the query feature", dim, unit_norm=False)[0]
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise InvalidInputError("the query feature must not be all zeros")
    return vector / norm


def _check_method_params(params: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Per-method parameters must name registered methods (a misspelt name would otherwise be
    ignored silently and the method run with its defaults)."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise InvalidInputError(f"params must map method names to their parameters, got "
                                f"{type(params).__name__}")
    known = [BASELINE, *list_rerankers()]
    unknown = sorted(str(name) for name in params if name not in known)
    if unknown:
        raise InvalidInputError(f"params names no method {unknown}; the methods are "
                                f"{', '.join(known)}")


def default_allowed_roots() -> list[Path]:
    """Folders a gallery may be opened from when none are configured: the home folder, the
    working folder and the shipped demo gallery."""
    return [Path.home(), Path.cwd(), DEMO_GALLERY]
