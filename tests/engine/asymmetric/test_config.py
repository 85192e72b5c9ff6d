"""SSPConfig refuses bad fields with an InvalidInputError that names the field."""

from __future__ import annotations

import pytest

from engine.asymmetric.config import SSPConfig
from engine.errors import InvalidInputError


def test_bad_config_fields_raise_invalid_input_errors():
    for field, value in (("subspaces", 0), ("centroids", 100), ("training", "gpu"),
                         ("learning_rate", float("nan")), ("head_init", "zeros")):
        with pytest.raises(InvalidInputError, match=field):
            SSPConfig(**{field: value})
