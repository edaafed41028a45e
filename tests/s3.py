"""A real S3 API on loopback for the object-store tests: moto's server mode
(`ThreadedMotoServer`), started once per test session in a thread of the test process and
spoken to over HTTP by the real clients (obstore in the code under test, boto3 to make
buckets). Each test gets a bucket of its own.

Fixtures: `s3_endpoint` (the server's URL), `s3_bucket` (a fresh bucket's name),
`s3_store` (the `store` settings section for that bucket, under the prefix `hps`).
`s3_auth(on)` makes the server check credentials (it accepts any by default).
tests/conftest.py registers this module as a plugin; moto is imported only when a test
asks for the server.
"""

from __future__ import annotations

import logging
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

ACCESS_KEY = "hps-test-key"
SECRET_KEY = "hps-test-SECRET-do-not-log"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )
    client.create_bucket(Bucket=name)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    name = f"hps-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_endpoint, name)
    return name


def store_section(endpoint: str, bucket: str, prefix: str = "hps") -> dict[str, Any]:
    """The `store` settings of `bucket` on the test server."""
    return {
        "url": f"s3://{bucket}/{prefix}",
        "endpoint_url": endpoint,
        "region": REGION,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    }


def store_env(section: dict[str, Any]) -> dict[str, str]:
    """The same settings as environment variables, for `python -m cli ...` processes."""
    return {f"HPS_STORE__{key.upper()}": str(value) for key, value in section.items()}


@pytest.fixture
def s3_store(s3_endpoint: str, s3_bucket: str) -> dict[str, Any]:
    return store_section(s3_endpoint, s3_bucket)


def s3_auth(endpoint: str, on: bool) -> None:
    """Make moto check every request's credentials (its IAM knows none of ours: every
    request is refused) or accept any again."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0" if on else b"inf",
        headers={"Content-Type": "text/plain"},  # a form body would not reach moto
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()
