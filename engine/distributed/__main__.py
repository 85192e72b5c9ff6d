"""`python -m engine.distributed`: embed a big image folder on Ray, and merge the shards.

    python -m engine.distributed embed FOLDER --out DIR [--address auto] [--backbone NAME]
        [--batch-size N] [--actors N] [--shard-size N] [--num-cpus N]
    python -m engine.distributed merge DIR [--to FILE] [--labels FOLDER]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    from engine.distributed.embed import DEFAULT_BATCH_SIZE
    from engine.distributed.shards import DEFAULT_SHARD_SIZE
    from engine.features.backbone import DEFAULT_BACKBONE

    parser = argparse.ArgumentParser(prog="python -m engine.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a folder's images into shards (resumes)")
    embed.add_argument("folder", help="the image folder (shared storage on a cluster)")
    embed.add_argument("--out", required=True, help="output folder: shards + manifest.json")
    embed.add_argument("--address", default=None,
                       help="Ray cluster address ('auto', ray://...); default $RAY_ADDRESS, "
                            "else a local cluster")
    embed.add_argument("--backbone", default=DEFAULT_BACKBONE)
    embed.add_argument("--weights", default="auto", help="'auto', 'hub' or a checkpoint file")
    embed.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    embed.add_argument("--actors", type=int, default=None,
                       help="actor pool size (default one per GPU, else CPUs - 1)")
    embed.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    embed.add_argument("--num-cpus", type=int, default=None,
                       help="CPUs of a local cluster (default all)")
    embed.add_argument("--merge", action="store_true", help="merge the shards afterwards")
    merge = commands.add_parser("merge", help="write one features file from the shards")
    merge.add_argument("out", help="the folder `embed` wrote")
    merge.add_argument("--to", default=None, help="the features file (default DIR/features.npz)")
    merge.add_argument("--labels", default=None,
                       help="folder with labels.csv or class sub-folders (default: the "
                            "embedded folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from engine.distributed.embed import embed_folder
    from engine.distributed.shards import merge_shards

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            print(f"wrote {merge_shards(args.out, args.to, args.labels)}")
            return 0
        from tqdm import tqdm

        with tqdm(unit="img", desc="embedding") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            summary = embed_folder(
                args.folder, args.out, backbone=args.backbone, weights=args.weights,
                address=args.address, batch_size=args.batch_size, actors=args.actors,
                shard_size=args.shard_size, num_cpus=args.num_cpus, progress=progress)
        print(f"{summary.out}: {summary.shards} shards ({summary.written} written, "
              f"{summary.reused} reused), {summary.files} files, {summary.embedded} embedded "
              f"now ({summary.images_per_second:.1f} images/s), {len(summary.skipped)} skipped")
        for name, reason in summary.skipped.items():
            print(f"  skipped {name}: {reason}")
        if args.merge:
            print(f"wrote {merge_shards(summary.out)}")
        return 0
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
