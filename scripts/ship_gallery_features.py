"""Write a gallery's features into its folder, so that a fresh clone loads them instead of
embedding every image (`engine.search.gallery.shipped_features_path`; checked at load, see
`engine/search/gallery.py`). Rerun it whenever the images or the backbone change.

    python scripts/ship_gallery_features.py                       # the demo gallery, lite0
    python scripts/ship_gallery_features.py --gallery PATH --backbone tf_efficientnet_lite2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.features.backbone import DEFAULT_BACKBONE, get_extractor
from engine.search.gallery import (
    DEMO_GALLERY,
    Gallery,
    save_shipped_features,
    shipped_features_path,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=Path, default=DEMO_GALLERY)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shipped = shipped_features_path(args.gallery.resolve(), args.backbone)
    if shipped.exists():
        shipped.unlink()  # embed every image afresh rather than seed from the old file
    with tempfile.TemporaryDirectory() as cache:
        gallery = Gallery.open(args.gallery, extractor=get_extractor(args.backbone, device="cpu"),
                               cache_root=cache, device="cpu")
        path = save_shipped_features(gallery)
    logging.info("wrote %s: %d features of %s", path, gallery.size, args.backbone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
