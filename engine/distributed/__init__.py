"""Embedding image folders too big for one machine, with Ray Data (`python -m
engine.distributed`).

`embed_folder` lists a folder, splits its files into shards, embeds the shards not written yet
in a Ray actor pool (one backbone per actor) and writes each shard with a manifest into an
output folder; `merge_shards` turns the shards into one features file that
`Explorer.open_features` / `Gallery.open_features` open. Ray is an optional extra
(`pip install -r requirements-scale.txt`): it is imported inside the functions that need it, so
`import engine.distributed` works without it.
"""

from engine.distributed.embed import EmbedSummary, embed_folder
from engine.distributed.shards import (
    MANIFEST_FILE,
    MERGED_FILE,
    Manifest,
    ShardPlan,
    merge_shards,
    plan_shards,
    read_manifest,
)

__all__ = [
    "MANIFEST_FILE",
    "MERGED_FILE",
    "EmbedSummary",
    "Manifest",
    "ShardPlan",
    "embed_folder",
    "merge_shards",
    "plan_shards",
    "read_manifest",
]
