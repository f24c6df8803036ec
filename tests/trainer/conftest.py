from __future__ import annotations

import pytest

from kuberft_core.models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a character tokenizer, saved once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
