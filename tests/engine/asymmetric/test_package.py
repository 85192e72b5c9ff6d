"""The asymmetric package: every module imports without timm, faiss or gradio (they load when a
model is built or anchors are trained), public names included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_importing_the_modules_does_not_import_timm_or_faiss():
    code = ("import importlib, pkgutil, sys, engine.asymmetric, engine.bench.asymmetric; "
            "names = [m.name for m in pkgutil.iter_modules(engine.asymmetric.__path__, "
            "'engine.asymmetric.')]; "
            "[importlib.import_module(name) for name in names]; "
            "[getattr(engine.asymmetric, name) for name in engine.asymmetric.__all__]; "
            "print(len(names)); "
            "print(sorted({'timm', 'faiss', 'gradio'} & set(sys.modules)))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[3]).stdout
    count, loaded = output.strip().splitlines()
    assert int(count) >= 9  # config, losses, anchors, heads, network, training, model, ...
    assert loaded == "[]"

