"""fit_or_load refuses bad training inputs with InvalidInputErrors and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from engine.asymmetric.config import SSPConfig
from engine.asymmetric.model import fit_or_load
from engine.errors import InvalidInputError
from tests.engine.asymmetric.ssp_data import DIM, TINY, fake_gallery_meta, tiny_images, unit_rows


def test_bad_training_inputs_raise_invalid_input_errors_and_write_nothing(tmp_path):
    meta = fake_gallery_meta()
    with pytest.raises(InvalidInputError, match="training images"):
        fit_or_load([], tmp_path, gallery_features=np.zeros((0, DIM), np.float32),
                    gallery_meta=meta)
    images = tiny_images(10)
    with pytest.raises(InvalidInputError, match="must divide"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(10), gallery_meta=meta,
                    config=SSPConfig(**{**TINY, "subspaces": 7}))
    bad = unit_rows(10)
    bad[2] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        fit_or_load(images, tmp_path, gallery_features=bad, gallery_meta=meta,
                    config=SSPConfig(**TINY))
    with pytest.raises(InvalidInputError, match="rows of gallery features"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(9), gallery_meta=meta,
                    config=SSPConfig(**TINY))
    with pytest.raises(InvalidInputError, match="gallery_extractor or gallery_meta"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(10))
    assert not list(tmp_path.iterdir())  # nothing was written


def test_the_training_estimate_is_measured_from_the_config(tmp_path):
    """The estimate scales with the images and epochs, is in the range of a real training run,
    and `saved_model_path` names the state `fit_or_load` writes."""
    import time

    from engine.asymmetric.model import estimate_training_seconds, saved_model_path

    meta = fake_gallery_meta()
    config = SSPConfig(**TINY, query_weights="none")
    images, features = tiny_images(40), unit_rows(40)
    estimate = estimate_training_seconds(len(images), meta, config, device="cpu")
    started = time.perf_counter()
    fit_or_load(images, tmp_path, gallery_features=features, gallery_meta=meta, config=config,
                device="cpu")
    seconds = time.perf_counter() - started
    assert 0.1 * seconds < estimate < 10 * seconds
    path = saved_model_path(features, tmp_path, meta, config)
    assert path.with_suffix(".json").is_file()
    assert not saved_model_path(unit_rows(40, seed=1), tmp_path, meta, config).with_suffix(
        ".json").is_file()


def test_a_cancelled_training_saves_nothing_and_a_retry_trains(tmp_path):
    """The training reports every step (and while caching and initialising the head), so a
    cancel raised from its progress callback stops it there; nothing is saved."""
    from engine.errors import JobCancelled

    meta = fake_gallery_meta()
    config = SSPConfig(**{**TINY, "epochs": 4}, query_weights="none")
    images, features = tiny_images(40), unit_rows(40)
    messages = []

    def cancel_in_training(fraction, message):
        messages.append(message)
        if message.startswith("SSP: training step 2/"):
            raise JobCancelled("SSP was cancelled")

    with pytest.raises(JobCancelled):
        fit_or_load(images, tmp_path, gallery_features=features, gallery_meta=meta,
                    config=config, device="cpu", progress=cancel_in_training)
    assert any(m.startswith("SSP: caching activations") for m in messages)
    assert any(m.startswith("SSP: the head's initial map") for m in messages)
    assert messages[-2:] == ["SSP: training step 1/20", "SSP: training step 2/20"]
    assert not (tmp_path / "ssp").exists() or not list((tmp_path / "ssp").iterdir())
    model = fit_or_load(images, tmp_path, gallery_features=features, gallery_meta=meta,
                        config=config, device="cpu")
    assert not model.loaded and len(list((tmp_path / "ssp").iterdir())) == 2
