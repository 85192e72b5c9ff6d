"""Logging set-up shared by the command-line entry points (`launch.py`, the benchmarks)."""

from __future__ import annotations

import logging

QUIETED = ("faiss.loader", "httpx")
"""Loggers whose INFO lines read as errors or noise: faiss's loader logs every SIMD build it
tries and fails to load; Gradio checks its own start-up with httpx requests, each logged. What
matters (the search backend chosen, the device, the cache used) is logged once by the engine."""


def configure_logging(level: int = logging.INFO,
                      fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Log to stderr at `level`, with the noisy third-party loggers at WARNING."""
    logging.basicConfig(level=level, format=fmt)
    for name in QUIETED:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
