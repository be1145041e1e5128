"""A moto S3 server on loopback for the tests that talk to S3 (tune storage, bundle URIs, serve batch)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.demo import free_port


@contextlib.contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch, bucket: str, **env: str) -> Iterator[Any]:
    """Start moto, point AWS_ENDPOINT_URL and test keys (plus ``env``) at it, create ``bucket``; yield a client.

    The keys are also in a credentials file (AWS_SHARED_CREDENTIALS_FILE), as a node's own credentials
    would be: Ray workers started before this read that, since no key travels in a runtime_env."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    folder = Path(tempfile.mkdtemp(prefix="moto-credentials-"))
    credentials = folder / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_SHARED_CREDENTIALS_FILE": str(credentials), **env}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    try:
        yield client
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
