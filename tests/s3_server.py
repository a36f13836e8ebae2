"""A real S3-compatible server on loopback for the tests that read storage URIs (`s3_server` fixture).

moto in server mode runs as a subprocess in its own process group (stopped, with its children, at the
end of the session). The AWS variables point every S3 client of the session at it; pyarrow's
S3FileSystem reads `AWS_ENDPOINT_URL` itself, so `s3://bucket/key` URIs reach it unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

START_TIMEOUT_S = 20.0
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
}


@dataclass
class S3Server:
    endpoint: str  # "http://127.0.0.1:PORT"

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (if new) and return "s3://name"."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
            region="us-east-1", allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Stops a server started in its own process group (`start_new_session`): the group and nothing
    else, SIGTERM then SIGKILL after `wait_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _start(log) -> tuple[subprocess.Popen, str]:
    """Start moto on a free port and wait (bounded) until it answers HTTP."""
    for _attempt in range(3):  # the port may be taken between choosing and binding it
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(endpoint):
                return proc, endpoint
            time.sleep(0.1)
        alive = proc.poll() is None
        stop_group(proc)
        if alive:
            break  # it ran but never answered: another try would not help
    log.seek(0)
    tail = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"moto S3 server did not answer on {endpoint} within {START_TIMEOUT_S:.0f} s; "
                       f"its output:\n{tail}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the session, with the AWS variables pointing at it (restored after)."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]'; the dev extra has it)")
    with tempfile.TemporaryFile() as log:
        proc, endpoint = _start(log)
        try:
            with pytest.MonkeyPatch.context() as mp:
                for key, value in {**ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                    mp.setenv(key, value)
                yield S3Server(endpoint)
        finally:
            stop_group(proc)
