"""Start the Retrieval Explorer: index the gallery (cached), fit every re-ranker, serve the page.

    python launch.py                         # the demo gallery on http://127.0.0.1:7860
    python launch.py --gallery ~/photos --port 8000 --device cpu
    python launch.py --features vectors.npz --features-images ~/photos   # bring your own features
    python launch.py --features db.npz --features-queries q.npz --ground-truth gnd_roxford5k.pkl
    python launch.py --prepare-only --query-models lite2,ssp   # build every cache, then exit
    python launch.py --public --host 0.0.0.0 # hosted: uploads only, no server folders
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import JobQueue

logger = logging.getLogger("launch")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Query-by-image retrieval explorer: baseline search and re-rankers side by "
                    "side.")
    parser.add_argument("--gallery", metavar="PATH", default=None,
                        help="folder of images (labels from labels.csv or sub-folders); "
                             "default: the bundled demo gallery")
    parser.add_argument("--features", metavar="PATH", default=None,
                        help="open a features file (.npy, .npz, .safetensors: vectors another "
                             "model made) as the first gallery; --gallery, when given, opens "
                             "after it")
    parser.add_argument("--features-images", metavar="FOLDER", default=None,
                        help="images of the --features items, for thumbnails (their names are "
                             "paths relative to it)")
    parser.add_argument("--features-queries", metavar="PATH", default=None,
                        help="a features file of query vectors for the --features gallery (a "
                             "query/gallery split, same model and dimension): the page offers "
                             "them as its queries")
    parser.add_argument("--ground-truth", metavar="PATH", default=None,
                        help="revisited Oxford/Paris ground truth of --features-queries "
                             "(gnd_roxford5k.pkl style, items matched by name): each query "
                             "shows its Medium AP and the Compare table the Easy/Medium/Hard "
                             "mAP and mP@1/5/10 of every method")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default $GRADIO_SERVER_NAME, else "
                             "127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public Gradio share link")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the backbone, index and re-rankers run (default auto)")
    parser.add_argument("--cache-dir", metavar="PATH", default=None,
                        help="cache root for gallery features and state (default "
                             "$RETRIEVAL_EXPLORER_CACHE or ~/.cache/retrieval-explorer)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="queries served at once (default 2)")
    parser.add_argument("--allow-folder", metavar="PATH", action="append", default=None,
                        help="a folder under which the page may open galleries typed in by "
                             "users (repeatable; default: home, the working folder and the "
                             "demo gallery)")
    parser.add_argument("--public", action="store_true",
                        help="hosted mode, for a page open to anyone: no folder on the server "
                             "can be opened (no --allow-folder), visitors upload zips that "
                             "stay theirs and are deleted when they leave, errors show only "
                             "the app's own messages")
    parser.add_argument("--query-models", metavar="NAMES", type=_query_models, default=[],
                        help="comma-separated query models to build at start as well as the "
                             "default lite0 (lite2, ssp, procrustes, ridge: their gallery "
                             "index, the SSP model or closed-form map, map and scores); "
                             "others are built on first use")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the gallery cache, embedding map and Compare scores and "
                             "fit the re-rankers, then exit (e.g. to bake them into an image)")
    args = parser.parse_args(argv)
    if args.public and args.allow_folder:
        parser.error("--public opens no folder on the server: drop --allow-folder")
    if args.features_images and not args.features:
        parser.error("--features-images needs --features")
    if args.features_queries and not args.features:
        parser.error("--features-queries needs --features (the gallery they query)")
    if args.ground_truth and not args.features_queries:
        parser.error("--ground-truth needs --features-queries (the queries it scores)")
    if args.features and args.query_models:
        parser.error("--query-models embeds the first gallery's images: a --features gallery "
                     "has features of another model (drop --query-models)")
    return args


def _query_models(text: str) -> list[str]:
    """'lite2,ssp' -> ['lite2', 'ssp'] ('' -> []), checked against the known query models."""
    from engine import QUERY_MODELS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUERY_MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown query model(s) {', '.join(unknown)}; choose from {', '.join(QUERY_MODELS)}")
    return names


class TqdmProgress:
    """Maps the engine's (fraction, message) progress callback onto a terminal progress bar."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, fraction: float, message: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=100, unit="%", desc=message,
                             bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._bar.set_description(message, refresh=False)
        self._bar.update(round(fraction * 100) - self._bar.n)
        if fraction >= 1:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from engine import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    # Heavy imports here, so that `--help` answers at once. Everything the page imports is
    # imported now, in this thread, before any background job starts: two threads importing
    # the same modules at once can deadlock in Python's import locks.
    from app.page import build_app, launch_options
    from engine import DEMO_GALLERY, Explorer, JobQueue, configure_threads, resolve_device
    from engine.errors import EngineError

    configure_threads()
    # --prepare-only has nothing to serve: its jobs may take every core.
    budget = contextlib.nullcontext if args.prepare_only else None
    jobs = JobQueue(budget=budget)
    requests = JobQueue(budget=budget)  # work a user asked for: never behind background jobs
    progress = TqdmProgress()
    try:
        folder = args.gallery or (None if args.features else DEMO_GALLERY)
        explorer = Explorer.load(folder, device=args.device, cache_root=args.cache_dir,
                                 progress=progress,
                                 allowed_roots=[] if args.public else args.allow_folder,
                                 jobs=jobs, requests=requests, features=args.features,
                                 features_images=args.features_images,
                                 features_queries=args.features_queries,
                                 ground_truth=args.ground_truth)
        session = explorer.session(None)
        for query_model in args.query_models:
            explorer.prepare_query_model(session.key, query_model)
    except EngineError as error:
        logger.error("cannot start: %s", error)
        return 2
    finally:
        progress.close()
    logger.info("gallery %s: %d images, features and index ready (cache %s, device %s)",
                session.gallery.root, session.gallery.size, session.gallery.cache_dir,
                resolve_device(args.device))
    if args.prepare_only:
        requests.run_pending()
        jobs.run_pending()
        done = requests.jobs() + jobs.jobs()
        failed = [job for job in done if job.state == "failed"]
        for job in failed:
            logger.error("%s failed: %s", job.title, job.error)
        logger.info("gallery %s prepared (%d background jobs, %d failed)", session.gallery.root,
                    len(done), len(failed))
        return 0
    demo = build_app(explorer, concurrency_limit=args.concurrency, public=args.public)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                prevent_thread_lock=True, **launch_options(explorer, public=args.public))
    logger.info("serving on http://%s:%d; preparing the rest in the background (%d jobs)",
                args.host, args.port, len(jobs.jobs()))
    jobs.start()
    requests.start()
    threading.Thread(target=_report_when_idle, args=(jobs,), name="background-report",
                     daemon=True).start()
    demo.block_thread()
    return 0


def _report_when_idle(jobs: JobQueue) -> None:
    """Log once when the background jobs queued at start are all done."""
    jobs.wait_idle()
    failed = [job.title for job in jobs.jobs() if job.state == "failed"]
    logger.info("background preparation done%s", f" ({', '.join(failed)} failed)" if failed
                else "")


if __name__ == "__main__":
    sys.exit(main())
