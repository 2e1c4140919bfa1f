"""Shared fixtures: tiny offline tokenizer, config, model and processor; small test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_fo1.testing import tiny_config, tiny_model, tiny_processor, tiny_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores); use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def config(tokenizer):
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer, config):
    return tiny_processor(tokenizer, config)


@pytest.fixture(scope="session")
def model(config):
    return tiny_model(config, seed=0)


def make_image(width: int = 130, height: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def image():
    return make_image()
