"""Process helpers for compare.py: run a command with its output in a log, start a server and time its
first answer, stop it. Standard library only: compare.py runs under any Python."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class StageError(RuntimeError):
    """A measurement could not be taken; the message says why and where the log is."""


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path | None = None) -> str:
    """Run cmd to completion with stdout+stderr in `log`; return that output. Raises StageError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise StageError(f"timed out after {timeout:.0f} s (log: {log})") from None
    output = log.read_text(errors="replace")
    if rc != 0:
        raise StageError(f"exit status {rc} (log: {log})")
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    log: Path
    startup_s: float  # from the launch of the command to the first answered request


def start_server(cmd: list[str], env: dict[str, str], port: int, model: str, log: Path, timeout: float) -> Server:
    """Launch a server and wait for its first answered completion request (cold start, stage d).

    The clock starts right before the process is created and stops when a 1-token completion has
    come back with status 200: loading, compiling and warming up all count."""
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    base_url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    f.close()  # the child holds its own copy
    server = Server(proc, base_url, log, startup_s=float("nan"))
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise StageError(f"server exited with status {proc.returncode} before answering (log: {log})")
        if _completion_ok(base_url, model):
            server.startup_s = time.monotonic() - t0
            return server
        time.sleep(0.2)
    stop_server(server)
    raise StageError(f"server did not answer within {timeout:.0f} s (log: {log})")


def _completion_ok(base_url: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False  # not listening yet, or listening but not ready (503)


def served_model(server: Server) -> str:
    """The first model id the server reports at /v1/models (what clients must send as "model")."""
    try:
        with urllib.request.urlopen(f"{server.base_url}/v1/models", timeout=30) as response:
            return json.load(response)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:  # URLError is an OSError
        raise StageError(f"no model id at {server.base_url}/v1/models: {e!r} (log: {server.log})") from None


def group_rss_bytes(server: Server) -> int:
    """Resident memory of every process in the server's process group (its engine workers too)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[2]) == server.proc.pid:  # pgrp; the server leads its own group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss, in pages
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


def stop_server(server: Server) -> None:
    _stop_group(server.proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group of our own child (its engine workers too)."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    # Workers of the group that outlived their parent (vLLM's engine core) get the same end.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- how busy the machine was with other work during a measurement -------------------------------------


def become_subreaper() -> None:
    """Orphaned descendants (an engine's workers whose parent died first) are re-parented to us, so that
    reap_orphans() collects them and their CPU time counts as ours in getrusage(RUSAGE_CHILDREN)."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans() -> None:
    """Collect exited orphans. Only call when no subprocess.Popen of ours is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _busy_cpu_s() -> tuple[float, float]:
    """-> (CPU seconds all processes spent busy since boot, seconds stolen by the hypervisor), all cores."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu_s() -> float:
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class BackgroundLoad:
    """Cores kept busy by processes outside this benchmark between start() and stop().

    Busy time of the whole machine (/proc/stat) minus our own and our waited-for descendants' CPU time;
    a result near 0 means the engines had the machine to themselves."""

    def start(self) -> "BackgroundLoad":
        self.t0, (self.busy0, self.steal0), self.own0 = time.monotonic(), _busy_cpu_s(), _own_cpu_s()
        return self

    def stop(self) -> dict[str, float]:
        reap_orphans()
        wall = time.monotonic() - self.t0
        busy, steal = _busy_cpu_s()
        others = (busy - self.busy0) - (_own_cpu_s() - self.own0)
        return {"other_cores": max(0.0, others / wall), "steal_cores": (steal - self.steal0) / wall}
