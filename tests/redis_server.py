"""A real ``redis-server`` on a free loopback port, for the tests of the Redis store.

CI installs the Debian package (``.ci/run``); there a missing server fails the tests. On a
machine without it they are skipped, saying how to get it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port at most 55535 whose cluster bus port (10000 higher) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 55_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def need_redis_server() -> str:
    """The path of ``redis-server``; skips the test without one (fails it in CI)."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the Redis tests")
        pytest.skip(message)
    return path


class RedisServer:
    """One ``redis-server`` process: no persistence, loopback only, on its own port."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = need_redis_server()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tokenguard-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server options

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {log[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server (as a crash would)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def fresh_url(self, **options: str) -> str:
        """The server's URL with a prefix of its own (tests never see each other's keys)."""
        query = "&".join(f"{k}={v}" for k, v in {"prefix": f"t{uuid.uuid4().hex[:12]}", **options}.items())
        return f"{self.url}?{query}"


class RedisClusterServers:
    """A three-node Redis Cluster on loopback (no replicas), made with ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(free_cluster_port()) for _ in range(3)]
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            message = "redis-cli is not installed (Debian: apt-get install redis-tools)"
            if os.environ.get("CI"):
                pytest.fail(message + "; CI must run the Redis Cluster tests")
            pytest.skip(message)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(node.dir / "nodes.conf")]
            node.start()
        assert self.cli is not None
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [self.cli, "-p", str(n.port), "cluster", "info"], capture_output=True, text=True, timeout=10
                ).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in state for state in states):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not come up")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def fresh_url(self, **options: str) -> str:
        """A cluster URL (any node's address, ``cluster=true``) with a prefix of its own."""
        return self.nodes[0].fresh_url(cluster="true", **options)
