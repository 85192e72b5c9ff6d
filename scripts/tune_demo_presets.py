"""Find the demo gallery's presets the way the page's Tune view does, and ship them.

    python scripts/tune_demo_presets.py            # writes assets/demo_gallery/presets.json

For each training-free method: sweep its two neighbourhood sizes together, then its remaining
parameters one at a time at the best sizes (coordinate search), all on the fixed split of the
Tune view (every 10th image a query). A preset is stored only when it beats the authors'
defaults on that split; the note records both scores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluation.tuning import PRESETS_FILE, best_trial, save_preset, sweep
from engine.rerank import get_reranker_class, list_rerankers
from engine.search.gallery import DEMO_GALLERY, Gallery

PROTOCOL = "oxford17-split"
SIZE_GRIDS = {
    "k_reciprocal": {"k1": [15, 20, 30, 40, 50, 60, 70], "k2": [3, 4, 6, 8, 10, 12]},
    "gnn": {"k1": [15, 20, 26, 32, 40, 48], "k2": [3, 5, 7, 10, 12, 15]},
    "icfrr": {"KG": [8, 16, 24, 32, 48, 64, 96], "KQ": [8, 16, 24, 32, 48, 64, 96]},
}
OTHER_GRIDS = {
    "lambda_value": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    "beta": [0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
    "n_times": [1, 2, 3, 5, 8, 12],
}


def tune(method: str, features, labels) -> tuple[dict, float, float]:
    """Best parameters of `method` on the split, its mAP, and the defaults' mAP."""
    defaults = get_reranker_class(method).Params().as_dict()
    first = next(iter(SIZE_GRIDS[method]))
    default_map = sweep(method, {first: [defaults[first]]}, features, labels, PROTOCOL)[0].map
    best = best_trial(sweep(method, SIZE_GRIDS[method], features, labels, PROTOCOL))
    for name, values in OTHER_GRIDS.items():
        if name in best.params:
            base = {key: value for key, value in best.params.items() if key != name}
            best = max(best, best_trial(sweep(method, {name: values}, features, labels,
                                              PROTOCOL, base)),
                       key=lambda trial: (trial.map, trial.p1))
    return best.params, best.map, default_map


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", default=str(DEMO_GALLERY))
    parser.add_argument("--methods", nargs="*", default=None,
                        help="methods to tune (default: every registered one with a grid); "
                             "other methods' presets are kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    gallery = Gallery.open(args.gallery, device="cpu")
    labelled = gallery.labels >= 0
    features, labels = gallery.features[labelled], gallery.labels[labelled]
    for method in list_rerankers():
        if method not in SIZE_GRIDS or (args.methods and method not in args.methods):
            continue
        params, best_map, default_map = tune(method, features, labels)
        print(f"{method}: best mAP {best_map:.4f} at {params} (defaults {default_map:.4f})")
        if best_map > default_map:
            save_preset(gallery.root, method, params,
                        note=f"coordinate sweep on {PROTOCOL}: mAP {best_map:.4f} "
                             f"(authors' defaults {default_map:.4f})")
    print(f"wrote {gallery.root / PRESETS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
