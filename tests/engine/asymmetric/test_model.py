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
