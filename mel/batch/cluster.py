"""A Ray cluster of several nodes on this machine (a head and `ray start --address` workers), for
tests and benchmarks of what a real cluster does; a real cluster is started the same way, one
`ray start` per machine:

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...     # the same token on every node and the driver
    ray start --head --port 6379 --num-cpus N         # on the head machine
    ray start --address HEAD:6379 --num-cpus N        # on every other machine
    python -m mel batch link ... --address HEAD:6379

`LocalCluster` runs each `ray start` with `--block` in its own process group and stops exactly
those processes when it exits (never `ray stop`, which would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env() -> dict:
    """RAY_AUTH_MODE=token and a RAY_AUTH_TOKEN (the one set, else a new random one)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: float = 1, object_store_mb: int = 300, timeout_s: float = 90):
        self.nodes, self.cpus, self.store_mb, self.timeout_s = nodes, cpus_per_node, object_store_mb, timeout_s
        self.procs: list[subprocess.Popen] = []
        self.address = None
        self.env = {**os.environ, **token_env()}

    def _ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def __enter__(self) -> "LocalCluster":
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        common = ["--num-cpus", str(self.cpus), "--object-store-memory", str(self.store_mb * 2**20),
                  "--disable-usage-stats", "--block"]
        try:
            self._start([self._ray(), "start", "--head", "--port", str(port), "--include-dashboard", "false",
                         *common])
            self._wait(1)
            for _ in range(self.nodes - 1):
                self._start([self._ray(), "start", "--address", self.address, *common])
            self._wait(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, cmd):
        log = open(os.devnull, "wb")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait(self, n_nodes: int):
        """Until `ray status` lists n_nodes alive nodes (or the timeout)."""
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {p.returncode}; run it by hand to see why")
            out = subprocess.run([self._ray(), "status", "--address", self.address], env=self.env,
                                 capture_output=True, text=True).stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
            if active.count("node_") >= n_nodes:
                return
            time.sleep(1)
        raise RuntimeError(f"the local Ray cluster did not reach {n_nodes} nodes in {self.timeout_s:.0f} s")

    def _disconnect_driver(self):
        """ray.shutdown() in this process when it is a driver of this cluster. It must come before the
        nodes stop: a driver whose raylet dies ends its whole process with exit code 1 a moment later."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        try:
            gcs = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - a half-torn-down runtime: disconnect all the same
            gcs = self.address
        if str(gcs).rsplit(":", 1)[-1] == self.address.rsplit(":", 1)[-1]:  # Ray names the host by another address
            ray.shutdown()

    def stop(self):
        if self.procs:
            self._disconnect_driver()
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # the `ray start --block` and the node processes it started
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def __exit__(self, *exc):
        self.stop()
