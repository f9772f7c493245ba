import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_blip
from tiny_blip2 import save_tiny_blip2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny BLIP retrieval checkpoint saved with save_pretrained (32 px images, 17 tokens)."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_blip2_dir(tmp_path_factory) -> Path:
    """A random tiny BLIP-2 retrieval checkpoint (8 queries, 32 px images, 17 ViT tokens of 32 channels)."""
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))


@pytest.fixture(scope="session", params=["blip", "blip-2"])
def family_model_dir(request) -> Path:
    """The tiny checkpoint of each model family: tests that take it run once per family."""
    return request.getfixturevalue({"blip": "tiny_model_dir", "blip-2": "tiny_blip2_dir"}[request.param])


@pytest.fixture(scope="session")
def family_model(family_model_dir):
    from blipsearch.retrieval.models import load_model

    return load_model(str(family_model_dir), device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from blipsearch.retrieval.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", precision="fp32")


@pytest.fixture(scope="session", autouse=True)
def private_user_cache(tmp_path_factory):
    """Model hashes and converted weights go to a temporary cache, never the user's (subprocesses too)."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous
