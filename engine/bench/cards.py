"""Run cards of benchmark runs: every `python -m engine.bench` run (the main table, the
revisited table and the online table) writes one (`--card-out PATH`, by default
`<cache root>/runs/bench-<UTC time>.json`: the cache root is `--cache-dir`, else
`$RETRIEVAL_EXPLORER_CACHE`, else ~/.cache/retrieval-explorer), and
`python -m engine.bench --card run.json` runs again what a card describes (its options are
recorded in the card, with each method's complete parameters) and prints the card's figures
beside the new ones: accuracy as differences (4 decimals), times and memory as ratios
(new / card). The asymmetric (`--asymmetric`) and scale (`--scale`) tables are not covered.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.bench.tables import markdown_table
from engine.errors import InvalidInputError
from engine.evaluation.runcard import MethodEntry, RunCard, figures_of, json_value, run_card
from engine.evaluation.scores import load_average
from engine.rerank.setting import resolve_setting

BENCH_KIND = "benchmark"
RUNS_FOLDER = "runs"
RATIO_MARKERS = (" s", "ms", "MiB")
"""A figure whose header contains one of these is a time or memory: compared as a ratio."""


@dataclass
class BenchRun:
    """What one benchmark run produced: its printed table and the card's ingredients.

    headers / rows: the figures (numbers, not formatted), the first column naming the row.
    gallery: the card's gallery entry. specs: the methods as given (name[:params]).
    """

    mode: str
    title: str
    table: str
    headers: list[str]
    rows: list[list[Any]]
    gallery: dict[str, Any]
    protocol: str
    specs: list[str] = field(default_factory=list)
    backbone: str | None = None
    weights: str | None = None


def method_entries_of(specs: Sequence[str], parse: Any) -> list[MethodEntry]:
    """Each spec's complete parameters (the paper's defaults where it names none) and their
    source: "authors' defaults" or "custom" (given on the command line)."""
    entries = [MethodEntry("baseline")]
    for spec in specs:
        name, params = parse(spec)
        setting = resolve_setting(name, params or None, {})
        entries.append(MethodEntry(name, json_value(dict(setting.params)), setting.source))
    return entries


def full_spec(entry: MethodEntry) -> str:
    """A method spec naming every parameter ("gnn:k1=26,k2=7,lambda_value=0.3"), so that a
    re-run uses the card's values even where the defaults have changed since."""
    values = ",".join(f"{key}={spec_value(value)}" for key, value in entry.params.items())
    return f"{entry.method}:{values}" if values else entry.method


def spec_value(value: Any) -> str:
    """A parameter value as `parse_method` reads it back: true/false, or the number (a float's
    repr keeps every digit)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def recorded_argv(args: argparse.Namespace, methods: Sequence[str]) -> list[str]:
    """The options that reproduce a run (paths made absolute; `methods` as the run used them)."""
    argv: list[str] = []
    if args.synthetic:
        argv += ["--synthetic", str(args.synthetic), "--dim", str(args.dim),
                 "--spread", repr(args.spread)]
    elif args.features:
        argv += ["--features", str(Path(args.features).resolve())]
        if args.queries is not None:
            argv += ["--queries", str(Path(args.queries).resolve()),
                     "--gnd", str(Path(args.gnd).resolve())]
    elif args.gallery:
        argv += ["--gallery", str(Path(args.gallery).resolve())]
    argv += ["--protocol", args.protocol, "--device", args.device]
    if args.top is not None:
        argv += ["--top", str(args.top)]
    if args.online_queries is not None:
        argv += ["--online-queries", str(args.online_queries)]
    if args.cache_dir is not None:
        argv += ["--cache-dir", str(Path(args.cache_dir).resolve())]
    if args.online:
        argv.append("--online")
    if args.busy:
        argv.append("--busy")
    if methods:
        argv += ["--methods", *methods]
    return argv


def bench_card(run: BenchRun, args: argparse.Namespace, device: str, parse: Any) -> RunCard:
    """The card of a benchmark run; its `extra["bench"]` holds the options that reproduce it,
    methods with their complete parameters (except the online table, whose rows follow the
    presets of the methods named)."""
    entries = method_entries_of(run.specs, parse)
    methods = (list(args.methods or []) if run.mode == "online"
               else [full_spec(entry) for entry in entries[1:]])
    return run_card(kind=BENCH_KIND, gallery=run.gallery, protocol=run.protocol,
                    methods=entries, figures=figures_of(run.headers, run.rows), device=device,
                    backbone=run.backbone, weights=run.weights,
                    extra={"bench": {"mode": run.mode, "title": run.title,
                                     "specs": list(run.specs),
                                     "argv": recorded_argv(args, methods)},
                           "load_1min": load_average(), "cpus": os.cpu_count()})


def default_card_path(cache_root: Path) -> Path:
    """`<cache root>/runs/bench-<UTC time with ms>.json`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3] + "Z"
    return Path(cache_root) / RUNS_FOLDER / f"bench-{stamp}.json"


def replay_argv(card: RunCard, device: str | None) -> list[str]:
    """The options a card's run was made with (`device` replaces the recorded one when
    given). A card that the benchmark did not write raises InvalidInputError."""
    bench = card.extra.get("bench")
    if card.kind != BENCH_KIND or not isinstance(bench, dict) \
            or not isinstance(bench.get("argv"), list):
        raise InvalidInputError(f"this run card ({card.kind}) was not written by "
                                "`python -m engine.bench`: it records no benchmark options to "
                                "run again")
    argv = [str(item) for item in bench["argv"]]
    if device is not None:
        at = argv.index("--device") if "--device" in argv else -1
        if at >= 0:
            argv[at + 1] = device
        else:
            argv += ["--device", device]
    return argv


def comparison(card: RunCard, now: RunCard) -> str:
    """The card's figures beside the new run's: per row and figure, both values and the
    difference (accuracy, 4 decimals) or the ratio new / card (times and memory); then the
    environment that differs (device, packages, commit, weights, gallery)."""
    headers = card.figures["headers"]
    before, after = card.figures["rows"], now.figures["rows"]
    if len(before) == len(after):  # the same methods in the same order (a re-run names them
        pairs = list(zip(before, after, strict=True))  # with all their parameters)
    else:
        found = {str(row[0]): row for row in after}
        pairs = [(row, found.get(str(row[0]), [])) for row in before]
    lines = []
    for old, new in pairs:
        old_values = dict(zip(headers, old, strict=False))
        new_values = dict(zip(now.figures["headers"], new, strict=False))
        for header in headers[1:]:
            a, b = old_values.get(header), new_values.get(header)
            if a is None and b is None:
                continue
            lines.append([str(old[0]), header, _shown(a), _shown(b), _change(header, a, b)])
    table = markdown_table(
        f"Run card of {card.date} ({card.device}) against this run ({now.device}); accuracy as "
        "a difference (this run - card), times and memory as a ratio (this run / card)",
        ["row", "figure", "card", "this run", "difference or ratio"], lines)
    notes = []
    for name in ("device", "git_commit", "weights_sha256", "engine_version"):
        if getattr(card, name) != getattr(now, name):
            notes.append(f"{name}: {getattr(card, name)} -> {getattr(now, name)}")
    if card.gallery.get("fingerprint") != now.gallery.get("fingerprint"):
        notes.append(f"gallery fingerprint: {card.gallery.get('fingerprint')} -> "
                     f"{now.gallery.get('fingerprint')}")
    for package in sorted(card.packages.keys() | now.packages.keys()):
        if card.packages.get(package) != now.packages.get(package):
            notes.append(f"{package}: {card.packages.get(package)} -> "
                         f"{now.packages.get(package)}")
    return table + "\n\n" + ("differences in the environment: " + "; ".join(notes) if notes
                             else "same environment (device, packages, commit, weights, gallery)")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _shown(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-" if value is None else str(value)
    return f"{number:.4f}" if abs(number) < 1000 else f"{number:.0f}"


def _change(header: str, before: Any, after: Any) -> str:
    a, b = _number(before), _number(after)
    if a is None or b is None:
        return "-"
    if any(marker in header for marker in RATIO_MARKERS):
        return f"x{b / a:.2f}" if a > 0 else "-"
    return f"{b - a:+.4f}"
