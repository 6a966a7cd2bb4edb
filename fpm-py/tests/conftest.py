"""Fixtures for the Python package's tests: a private nats-server, the repository's `fpm`
binary, the Dynamo/SGLang peers of interop/dynamo_peer.py, and the upstream modules loaded
from their wheels (contract-tests/python/upstream.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "contract-tests" / "python"))

import upstream  # noqa: E402


@pytest.fixture
def tmp_ipc():
    """A short temporary directory for ipc sockets (unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fpmpy-", dir="/tmp") as d:
        yield d


@pytest.fixture
def nats_url(tmp_path):
    """A nats-server of its own on a free port."""
    log = tmp_path / "nats.log"
    p = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", "-1", "-l", str(log), "--store_dir", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    port = None
    while time.time() < deadline and port is None:
        if log.exists():
            m = re.search(r"client connections on 127\.0\.0\.1:(\d+)", log.read_text())
            if m:
                port = int(m.group(1))
        time.sleep(0.02)
    assert port, "nats-server did not start"
    yield f"nats://127.0.0.1:{port}"
    p.terminate()
    p.wait(5)


@pytest.fixture
def fpm_bin() -> Path:
    """The `fpm` binary built from this repository (FPM_BIN, else target/debug/fpm)."""
    p = Path(os.environ.get("FPM_BIN", REPO / "target" / "debug" / "fpm"))
    assert p.is_file(), f"{p} missing: run `cargo build -p fpm-cli` first"
    return p


class Peer:
    """interop/dynamo_peer.py in a subprocess; its stdout JSON lines."""

    def __init__(self, args: list[str], nats_url: str, kv: Path):
        env = dict(os.environ, NATS_SERVER=nats_url, DYN_FILE_KV=str(kv), DYN_LOG="error", PYTHONUNBUFFERED="1")
        self.ready = kv / f"ready-{time.monotonic_ns()}"
        self.p = subprocess.Popen(
            [sys.executable, str(REPO / "interop" / "dynamo_peer.py"), *args, "--ready-file", str(self.ready)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not self.ready.exists():
            assert self.p.poll() is None, f"peer exited with {self.p.returncode}"
            assert time.time() < deadline, "peer never became ready"
            time.sleep(0.05)

    def lines(self, timeout: float = 60) -> list[dict]:
        out, _ = self.p.communicate(timeout=timeout)
        return [json.loads(l) for l in out.splitlines() if l.startswith("{")]

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def peer(nats_url, tmp_path):
    started: list[Peer] = []

    def start(*args: str) -> Peer:
        p = Peer(list(args), nats_url, tmp_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture(scope="session")
def sglang():
    return upstream.load("sglang")


@pytest.fixture(scope="session")
def dynamo():
    return upstream.load("dynamo")
