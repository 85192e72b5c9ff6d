"""Build the built-in demo gallery (assets/demo_gallery) from the Oxford 17 flower photos.

Every photo listed in the source `labels.csv` is decoded with `engine.features.images.load_image`,
downscaled so that its longer side is `--max-side` pixels and written as a JPEG with the same file
name (no EXIF or ICC data) into `<dest>/images/`. The script also writes `<dest>/labels.csv`
(`file,label,class_name`, `file` relative to the images folder), `<dest>/examples.txt` (one query
image per line) and `<dest>/README.md` with the dataset credit.

    python scripts/make_demo_gallery.py --source path/to/oxford17 \
        --dest assets/demo_gallery --max-side 256 --quality 85
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path

from tqdm import tqdm

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.storage import atomic_write_bytes, safe_join
from engine.errors import InvalidImageError, InvalidInputError
from engine.features.images import load_image, make_thumbnail

REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("make_demo_gallery")

LABEL_COLUMNS = ("file", "label", "class_name")

# The first photo of every third class (Oxford 17 lists 80 photos per class in class order):
# daffodil, bluebell, tigerlily, sunflower, dandelion, windflower.
DEFAULT_EXAMPLES = (
    "image_0001.jpg",
    "image_0241.jpg",
    "image_0481.jpg",
    "image_0721.jpg",
    "image_0961.jpg",
    "image_1201.jpg",
)

CREDIT = (
    "Oxford 17 Category Flower Dataset, M.-E. Nilsback and A. Zisserman, Visual Geometry Group, "
    "University of Oxford, 2006 — published as a research dataset; thumbnails downscaled to "
    "{max_side} px for this demo"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("/work/shared/datasets/oxford17"),
        help="dataset folder holding labels.csv and the photos it lists",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=REPO_ROOT / "assets" / "demo_gallery",
        help="output folder (images/, labels.csv, examples.txt, README.md)",
    )
    parser.add_argument("--max-side", type=int, default=256, help="longest side in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality, 1-95")
    parser.add_argument(
        "--examples",
        nargs="+",
        default=list(DEFAULT_EXAMPLES),
        help="file names of the example queries, each from a different class",
    )
    args = parser.parse_args(argv)
    if args.max_side < 16:
        parser.error("--max-side must be at least 16")
    if not 1 <= args.quality <= 95:
        parser.error("--quality must be between 1 and 95")
    return args


def read_labels(source: Path) -> list[dict[str, str]]:
    """Rows of `<source>/labels.csv`; InvalidInputError if the file or a column is missing."""
    labels_path = source / "labels.csv"
    if not labels_path.is_file():
        raise InvalidInputError(f"{labels_path} not found; --source must hold labels.csv")
    with open(labels_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(LABEL_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise InvalidInputError(f"{labels_path} lacks the columns {sorted(missing)}")
        return [{column: row[column] for column in LABEL_COLUMNS} for row in reader]


def output_name(source: Path, listed: str) -> str:
    """A photo's name relative to the images folder: "images/image_0001.jpg" -> "image_0001.jpg"."""
    path = safe_join(source, listed)
    images_dir = (source / "images").resolve()
    relative = path.relative_to(images_dir) if path.is_relative_to(images_dir) else Path(path.name)
    return relative.with_suffix(".jpg").as_posix()


def encode_jpeg(path: Path, max_side: int, quality: int) -> bytes:
    thumbnail = make_thumbnail(load_image(path), max_side=max_side)
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def choose_examples(rows: list[dict[str, str]], wanted: list[str]) -> list[str]:
    """Check that every example is in the gallery and that no two share a class."""
    class_of = {row["file"]: row["class_name"] for row in rows}
    unknown = [name for name in wanted if name not in class_of]
    if unknown:
        raise InvalidInputError(f"example images not in the gallery: {unknown}")
    classes = [class_of[name] for name in wanted]
    if len(set(classes)) != len(classes):
        raise InvalidInputError(f"example images must come from different classes: {classes}")
    return list(wanted)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_readme(dest: Path, n_images: int, n_classes: int, args: argparse.Namespace) -> None:
    credit = CREDIT.format(max_side=args.max_side)
    text = f"""# Demo gallery

{credit}.

Dataset page: https://www.robots.ox.ac.uk/~vgg/data/flowers/17/

- `images/`: {n_images} photos of {n_classes} flower classes, longest side {args.max_side} px,
  JPEG quality {args.quality}, metadata stripped.
- `labels.csv`: `file,label,class_name`, with `file` relative to `images/`.
- `examples.txt`: example query images, one per line, each from a different class.

Rebuilt with:

    python scripts/make_demo_gallery.py --source <oxford17 folder> --dest assets/demo_gallery \\
        --max-side {args.max_side} --quality {args.quality}
"""
    atomic_write_bytes(dest / "README.md", text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    source, dest = args.source, args.dest
    images_dir = dest / "images"

    rows = read_labels(source)
    planned = [{**row, "file": output_name(source, row["file"])} for row in rows]
    examples = choose_examples(planned, args.examples)  # fail before any work
    images_dir.mkdir(parents=True, exist_ok=True)

    written: list[dict[str, str]] = []
    for row, out_row in tqdm(zip(rows, planned, strict=True), total=len(rows), unit="image"):
        try:
            data = encode_jpeg(safe_join(source, row["file"]), args.max_side, args.quality)
        except InvalidImageError as error:
            logger.warning("skipped: %s", error)
            continue
        atomic_write_bytes(safe_join(images_dir, out_row["file"]), data)
        written.append(out_row)
    if not written:
        logger.error("no image could be written; check --source")
        return 1

    keep = {row["file"] for row in written}
    for stale in images_dir.rglob("*"):
        relative = stale.relative_to(images_dir).as_posix()
        if stale.suffix == ".jpg" and stale.is_file() and relative not in keep:
            logger.info("removing %s (not in this build)", stale)
            stale.unlink()

    labels = io.StringIO()
    writer = csv.DictWriter(labels, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(written)
    atomic_write_bytes(dest / "labels.csv", labels.getvalue().encode("utf-8"))

    examples = choose_examples(written, examples)  # still there if some images were skipped
    atomic_write_bytes(dest / "examples.txt", "".join(f"{name}\n" for name in examples).encode())

    n_classes = len({row["class_name"] for row in written})
    write_readme(dest, len(written), n_classes, args)
    logger.info(
        "wrote %d images of %d classes to %s: %.1f MB in all",
        len(written),
        n_classes,
        dest,
        folder_bytes(dest) / 1e6,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
