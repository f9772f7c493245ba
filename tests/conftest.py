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


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """A test leaves torch's thread count as it found it: later tests would run single-threaded, and the CPU
    fast paths that need two threads (models/chunks.py) would go untested."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if before is not None and torch is not None:
        assert torch.get_num_threads() == before, "the test changed torch's thread count and left it so"


@pytest.fixture
def training_threads():
    """For a test that runs a training setup in this process: its config's `threads` sets torch's count for
    the process, as `blipsearch train` means it to; the count is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto's standalone server, a registry package) on a free local port, with the
    AWS environment pointed at it for this process and its subprocesses; yields its URL."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.terminate()
    server.wait(10)
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket (named after the test); returns its name."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name
