"""Separate "hosts" on one Linux machine: a network namespace each, joined by a bridge.

The namespaces (and the bridge's own namespace) are created by the test and removed when it
ends, with every process started in them. Each host has its own address on a private /24 that
nothing outside these namespaces can reach, its own working folder, temp dir, kdray cache and
HOME; the file system is still shared (network namespaces only), so a test proves what travels
by the network and the storage by giving each host its own folders, not by hiding the others.
Needs root (CAP_NET_ADMIN) and ``ip`` from iproute2; :func:`unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SITE = Path(__file__).parent / "netns_site"
SUBNET = "10.231.77"  # private to the bridge below: no route leads here from the host


def unavailable() -> str | None:
    """Why namespaces cannot be made here (no ``ip``, not root, not permitted), or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"kdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


class Hosts:
    """Named hosts (``head``, ``w1``, ...), host ``i`` at ``SUBNET.(i + 2)``."""

    def __init__(self, names: list[str], root: Path) -> None:
        tag = f"kd{os.getpid() % 100000}"
        self.tag = tag
        self.names = names
        self.netns = {name: f"{tag}-{name}" for name in names}
        self.address = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(names)}
        self.root = root
        self.work = {name: root / name for name in names}
        # Ray's socket paths must stay under 107 characters: short temp dirs under /tmp
        self.temp = {name: Path(tempfile.mkdtemp(prefix=f"{tag}{name}-")) for name in names}
        self.env = self._base_env()

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        local = ["127.0.0.1", "localhost", "::1", *self.address.values()]
        env.update(
            NO_PROXY=",".join(local),
            no_proxy=",".join(local),
            # this cluster's own hosts only: the test made every address it reaches
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            PYTHONUNBUFFERED="1",
        )
        return env

    def up(self) -> None:
        switch = f"{self.tag}-sw"
        _ip("netns", "add", switch)
        _ip("link", "add", "br0", "type", "bridge", netns=switch)
        _ip("link", "set", "br0", "up", netns=switch)
        for i, name in enumerate(self.names):
            ns, a, b = self.netns[name], f"{self.tag}v{i}a", f"{self.tag}v{i}b"
            _ip("netns", "add", ns)
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", switch)
            _ip("link", "set", b, "netns", ns)
            _ip("link", "set", a, "master", "br0", "up", netns=switch)
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("addr", "add", f"{self.address[name]}/24", "dev", b, netns=ns)
            _ip("link", "set", b, "up", netns=ns)
            (self.work[name] / "home").mkdir(parents=True, exist_ok=True)
            self._etc(name)

    def _etc(self, name: str) -> None:
        """The host's own /etc/hosts (every host by name, so a reverse lookup of an address
        never asks a DNS server) and resolv.conf (any DNS query goes to loopback, unanswered):
        ``ip netns exec`` lays /etc/netns/<namespace>/* over /etc."""
        folder = Path("/etc/netns") / self.netns[name]
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{a} {n}" for n, a in self.address.items())]
        (folder / "hosts").write_text("\n".join(lines) + "\n")
        (folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def host_env(self, name: str, **extra: str) -> dict[str, str]:
        """The environment of a command on host ``name``: its own HOME and kdray cache, and
        its address for Ray (see netns_site/sitecustomize.py)."""
        path = [str(SITE), *filter(None, [self.env.get("PYTHONPATH")])]
        return {
            **self.env,
            "PYTHONPATH": os.pathsep.join(path),
            "KDRAY_TEST_NODE_IP": self.address[name],
            "HOME": str(self.work[name] / "home"),
            "KDRAY_CACHE_DIR": str(self.work[name] / "kdray-cache"),
            **extra,
        }

    def popen(self, name: str, args: list[str], log: Path, **extra: str) -> subprocess.Popen:
        """``args`` started on host ``name`` in its working folder, output to ``log``."""
        with log.open("ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.netns[name], *args],
                cwd=self.work[name],
                env=self.host_env(name, **extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, name: str, args: list[str], timeout: float, **extra: str) -> tuple[int, str]:
        """``args`` run on host ``name``: its exit code and output (the log's new lines)."""
        log = self.work[name] / "commands.log"
        start = log.stat().st_size if log.exists() else 0
        process = self.popen(name, args, log, **extra)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = -9
        with log.open("rb") as f:
            f.seek(start)
            return code, f.read().decode(errors="replace")

    def pids(self, name: str) -> list[int]:
        """Every process in host ``name``'s namespace."""
        found = subprocess.run(
            ["ip", "netns", "pids", self.netns[name]], capture_output=True, text=True
        )
        return [int(p) for p in found.stdout.split()]

    def kill(self, name: str) -> int:
        """Every process of host ``name`` killed at once, as a machine that loses power."""
        killed = 0
        for _ in range(5):  # a dying raylet may still be forking
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.2)
        return killed

    def down(self) -> None:
        for name in self.names:
            self.kill(name)
        for ns in [*self.netns.values(), f"{self.tag}-sw"]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for folder in self.temp.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def hosts(names: list[str], root: Path) -> Iterator[Hosts]:
    made = Hosts(names, root)
    try:
        made.up()
        yield made
    finally:
        made.down()


def tool(name: str) -> str:
    """A console script of this Python's environment (ray, kdray, moto_server)."""
    return str(Path(sys.executable).parent / name)


def wait_for(check: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")
