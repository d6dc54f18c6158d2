"""The HTTP-socket rows of bench/run.py: calls through the agent against direct calls.

Each figure is measured against the same call made directly to the Conduce emulator, in the
same repetition:

* one-shot ``curl --unix-socket "$KEYAGENT_HTTP_SOCK" http://HOST/conduce/api/v1/user/
  list-teams`` against one-shot ``curl --cacert CA -H "Authorization: Bearer KEY" https://
  HOST/...`` (whole processes, median of many runs, the two interleaved);
* requests per second of 64 keep-alive clients (two Python processes of 32 threads, each
  thread one ``http.client`` connection) through the agent's HTTP socket, against 64 direct
  keep-alive HTTPS clients sending the key;
* ``get`` p99 on ``agent.sock`` (bench/loadgen.c) while 16 proxied downloads of an endless
  blob run, against the same agent idle.

The emulator runs as its own process (``python -m keyagent.testing serve``, from this tree),
so it does not share the benchmark's interpreter. ``bench/run.py --emulator-nice N`` runs it
at lower CPU priority: it stands in for a service on other machines, whose CPU use the
``get`` row would otherwise count against the agent (docs/performance.md). An agent without
an HTTP socket (before issue 12) skips these rows with a message; nothing here asserts.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keyagent.testing.agent import AgentProcess
from keyagent.testing.emulator_process import EmulatorProcess

ROOT = Path(__file__).resolve().parent.parent
USER = "bench@example.com"
TEAMS = "/conduce/api/v1/user/list-teams"
# The emulator's blob endpoint caps N at 2**40: a download that outlasts any measurement.
ENDLESS_BLOB = f"/api/v2/data/blob/{1 << 40}"
DOWNLOADS = 16
CLIENTS = 64

# One process of keep-alive clients: each thread opens one connection, makes one request to
# warm it, waits for all, then sends requests back to back until the window closes.
CLIENT_SCRIPT = r"""
import http.client, json, socket, ssl, sys, threading, time
mode, target, host, path, key_file, cafile, conns, seconds = json.loads(sys.argv[1])
name, _, port = host.rpartition(":")
headers = {}
if key_file:
    with open(key_file) as f:
        headers["Authorization"] = "Bearer " + f.read().strip()

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Connected before the timeout is set: with a timeout the socket is non-blocking,
        # and a Unix connect to a full backlog fails with EAGAIN instead of waiting.
        sock.connect(target)
        sock.settimeout(self.timeout)
        self.sock = sock

def connection():
    if mode == "unix":
        return UnixConnection(name, int(port), timeout=60)
    context = ssl.create_default_context(cafile=cafile)
    return http.client.HTTPSConnection(name, int(port), timeout=60, context=context)

window = [0.0, 0.0]
def open_window():
    window[0] = time.monotonic()
    window[1] = window[0] + seconds
ready = threading.Barrier(conns, action=open_window)
counts, finished, errors = [0] * conns, [0.0] * conns, []

def one(c):
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}")

def worker(i):
    try:
        c = connection()
        one(c)
        ready.wait()
        n = 0
        while time.monotonic() < window[1]:
            one(c)
            n += 1
        counts[i], finished[i] = n, time.monotonic()
        c.close()
    except Exception as error:
        errors.append(repr(error))
        ready.abort()

threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print(json.dumps({"error": errors[0]}))
    sys.exit(1)
print(json.dumps({"rps": sum(counts) / (max(finished) - window[0])}))
"""


class NoHttpSocket(Exception):
    """The agent under test has no HTTP socket (issue 12 not in this tree)."""


@contextmanager
def emulator() -> Iterator[tuple[EmulatorProcess, str]]:
    """An emulator process from this tree, with USER and one API key; yields (emu, key)."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    with EmulatorProcess(USER, "bench password", env=env) as emu:
        yield emu, emu.add_key(USER, "bench")


def http_socket(agent: AgentProcess) -> str:
    """The agent's HTTP socket, from ``status``; NoHttpSocket if it has none."""
    with agent.client() as client:
        status = client.status()
    path = status.get("http_socket")
    if not isinstance(path, str) or not path:
        raise NoHttpSocket(
            "skipping the HTTP-socket rows: the agent's status names no http_socket "
            "(this tree predates issue 12's authenticating HTTP socket)"
        )
    return path


def _curl_ms(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - started) * 1000


def one_shot_curl(
    sock: str, emu: EmulatorProcess, header_file: Path, runs: int
) -> tuple[float, float]:
    """Median ms of a whole ``curl`` through the agent and of one made directly."""
    url_path = emu.host + TEAMS
    through = ["curl", "-sS", "--fail", "-o", "/dev/null", "--unix-socket", sock]
    through.append(f"http://{url_path}")
    # The key goes in a 0600 header file (-H @FILE), not in argv.
    direct = ["curl", "-sS", "--fail", "-o", "/dev/null", "--cacert", emu.ca_path]
    direct += ["-H", f"@{header_file}", f"https://{url_path}"]
    # One of each first: the agent's pool and the page cache warm, as for any later tool.
    _curl_ms(through)
    _curl_ms(direct)
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(_curl_ms(through))
        theirs.append(_curl_ms(direct))
    return statistics.median(ours), statistics.median(theirs)


def clients_rps(
    mode: str, target: str, emu: EmulatorProcess, key_file: str, seconds: float
) -> float:
    half = CLIENTS // 2
    settings = [mode, target, emu.host, TEAMS, key_file, emu.ca_path, half, seconds]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, json.dumps(settings)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    total = 0.0
    for process in processes:
        output = json.loads(process.communicate()[0] or "{}")
        if process.returncode != 0 or "rps" not in output:
            raise RuntimeError(f"{mode} clients failed: {output.get('error', 'no output')}")
        total += float(output["rps"])
    return total


def keep_alive_rps(
    sock: str, emu: EmulatorProcess, key_file: Path, seconds: float
) -> tuple[float, float]:
    """Requests per second of 64 keep-alive clients through the agent, and direct."""
    ours = clients_rps("unix", sock, emu, "", seconds)
    theirs = clients_rps("tls", "", emu, str(key_file), seconds)
    return ours, theirs


def get_p99_during_downloads(
    sock: str, agent: AgentProcess, emu: EmulatorProcess, loadgen: str, samples: int
) -> tuple[float, float]:
    """``get`` p99 (µs) on agent.sock while 16 proxied downloads run, and idle."""
    idle = _p99(loadgen, agent.socket_path, samples)
    emu.clear_requests()
    url = f"http://{emu.host}{ENDLESS_BLOB}"
    downloads = [
        subprocess.Popen(
            ["curl", "-sS", "-o", "/dev/null", "--unix-socket", sock, url],
            stderr=subprocess.DEVNULL,
        )
        for _ in range(DOWNLOADS)
    ]
    try:
        # Streaming once the emulator has them all: waits on its request log, no sleep.
        if not emu.wait_for_requests(DOWNLOADS, timeout=30.0):
            raise RuntimeError("the proxied downloads did not reach the emulator in 30 s")
        busy = _p99(loadgen, agent.socket_path, samples)
        still_running = sum(download.poll() is None for download in downloads)
        if still_running < DOWNLOADS:
            raise RuntimeError(f"only {still_running} of {DOWNLOADS} downloads lasted")
    finally:
        for download in downloads:
            download.terminate()
        for download in downloads:
            download.wait()
    return busy, idle


def _p99(loadgen: str, sock: str, samples: int) -> float:
    output = subprocess.run(
        [loadgen, "lat", "ka", sock, str(samples)], capture_output=True, text=True, check=True
    ).stdout
    return float(dict(re.findall(r"(\w+)=([\d.]+)", output))["p99"]) / 1000


def lower_priority(pid: int, steps: int) -> None:
    """Lower the CPU priority of process ``pid`` and each of its threads by ``steps`` (nice
    is per thread on Linux; threads it starts later inherit their starter's)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        thread = int(task)
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + steps)


def write_key_files(workdir: Path, key: str) -> tuple[Path, Path]:
    """0600 files with the key (for the Python clients) and its header (for curl -H @FILE)."""
    key_file, header_file = workdir / "bench-key", workdir / "bench-key-header"
    for path, text in ((key_file, key), (header_file, f"Authorization: Bearer {key}")):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text + "\n")
    return key_file, header_file
