"""moto's S3 server on a loopback port, for the tests that read and write a bucket."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator

import pyarrow.fs as pafs


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_bucket(bucket: str, env: dict[str, str], unset: tuple[str, ...] = ()
                ) -> Iterator[tuple[str, pafs.S3FileSystem]]:
    """Start moto's S3 server, set `env` (credentials) and remove `unset` from the environment, make `bucket`;
    yield (endpoint, filesystem). Everything is put back afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in (*env, *unset)}
    os.environ.update(env)
    for name in unset:
        os.environ.pop(name, None)
    try:
        filesystem = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        filesystem.create_dir(bucket)
        yield endpoint, filesystem
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
