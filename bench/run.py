"""keyagent against OpenSSH's ssh-agent, measured in the same run on the same machine.

    python bench/run.py [--reps 3] [--quick] [--http-only] [--markdown FILE]

Each comparison is repeated ``--reps`` times with the two agents interleaved (A B A B ...),
the ratio is computed within each repetition, and the table shows the median with the
min-max range. The yardstick is ssh-agent with two ed25519 keys answering
REQUEST_IDENTITIES (message 11), the counterpart of keyagent's ``get``. A small C load
generator (bench/loadgen.c, built here with cc) drives both, so the client is not the
bottleneck; the Python-client rows use the same client logic for both agents.

A second table compares calls made through the agent's authenticating HTTP socket (issue
12) with the same calls made directly to the Conduce emulator (see bench/http_socket.py);
``--http-only`` runs that table alone.

Needs: cc, ssh-agent, ssh-add, ssh-keygen, taskset (util-linux), curl. Nothing here asserts:
benchmarks report, tests assert behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import http_socket  # noqa: E402
from keyagent.audit import DEFAULT_AUDIT_ENTRIES as AUDIT_RING  # noqa: E402
from keyagent.client import Client  # noqa: E402
from keyagent.errors import KeyagentError  # noqa: E402
from keyagent.testing.agent import AgentProcess, wait_for_exit  # noqa: E402


@dataclass
class Row:
    """One figure: keyagent's value, the reference's, per repetition."""

    name: str
    unit: str
    target: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    ratio_note: str = "keyagent / ssh-agent"

    def add(self, ours: float, theirs: float | None = None) -> None:
        self.ours.append(ours)
        if theirs is not None:
            self.theirs.append(theirs)

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.ours, self.theirs, strict=False) if b]


def spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run(*argv: str, **kwargs: object) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=True, **kwargs)  # type: ignore[call-overload]
    return str(result.stdout)


def parse(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


# --- the agents ------------------------------------------------------------------------------


@contextmanager
def ssh_agent(workdir: Path) -> Iterator[tuple[str, int]]:
    """ssh-agent on a temp socket with two ed25519 keys; yields (socket, pid)."""
    sock = workdir / "ssh-agent.sock"
    output = run("ssh-agent", "-a", str(sock))
    pid = int(re.search(r"SSH_AGENT_PID=(\d+)", output).group(1))  # type: ignore[union-attr]
    try:
        for name in ("k1", "k2"):
            key = workdir / name
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
            run("ssh-add", "-q", str(key), env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        yield str(sock), pid
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for_exit(pid, 10)


@contextmanager
def keyagent(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    """A keyagent holding two keys, like the ssh-agent above."""
    agent = AgentProcess(
        workdir / f"ka-{time.monotonic_ns()}", ["--no-keyring", *args], env=env, debug=False
    ).start()
    try:
        with agent.client() as client:
            client.add("app.conduce.com", "bench@example.com", "bench-key-one-0000000000")
            client.add("app.conduce.com", "bench@example.com", "bench-key-two-0000000000")
        yield agent
    finally:
        agent.stop()


def pin(pid: int, cpu: int) -> None:
    run("taskset", "-pc", str(cpu), str(pid))


# --- Python clients --------------------------------------------------------------------------


def python_client_rps(protocol: str, path: str, connections: int, seconds: float) -> float:
    """Requests per second from Python clients: one process, ``connections`` sockets."""
    script = f"""
import selectors, socket, struct, sys, time
proto, path, conns, seconds = {protocol!r}, {path!r}, {connections}, {seconds}
req = b'{{"op":"get"}}\\n' if proto == "ka" else struct.pack(">IB", 1, 11)
sel = selectors.DefaultSelector()
bufs = {{}}
for _ in range(conns):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.setblocking(False)
    s.send(req); sel.register(s, selectors.EVENT_READ); bufs[s] = b""
done = 0; end = time.monotonic() + seconds; start = time.monotonic()
while time.monotonic() < end:
    for key, _ in sel.select(0.1):
        s = key.fileobj; b = bufs[s] + s.recv(65536)
        while True:
            if proto == "ka":
                i = b.find(b"\\n")
                if i < 0: break
                b = b[i + 1:]
            else:
                if len(b) < 4: break
                n = struct.unpack(">I", b[:4])[0]
                if len(b) < 4 + n: break
                b = b[4 + n:]
            done += 1; s.send(req)
        bufs[s] = b
print(done / (time.monotonic() - start))
"""
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    return sum(float(p.communicate()[0]) for p in processes)


def whole_process_ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


@contextmanager
def installed_ctl(workdir: Path) -> Iterator[str]:
    """keyagent-ctl installed normally (not editable) in a fresh venv."""
    venv = workdir / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    # Built from a copy: pip builds in the source tree, and a build/ left in the checkout
    # (with stale manual pages, say) would change what later installs and tests see.
    source = workdir / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".nox", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    run(str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", str(source))
    yield str(venv / "bin" / "keyagent-ctl")


# --- the measurements ------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    parser.add_argument(
        "--http-only", action="store_true", help="only the HTTP-socket table (no ssh-agent)"
    )
    parser.add_argument(
        "--emulator-nice",
        type=int,
        default=0,
        metavar="N",
        help="run the Conduce emulator N steps below normal CPU priority (the service it "
        "stands in for runs on other machines; see docs/performance.md)",
    )
    args = parser.parse_args()
    tools = ["cc", "curl"]
    if not args.http_only:
        tools += ["ssh-agent", "ssh-add", "ssh-keygen", "taskset"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(
            f"missing tools: {', '.join(missing)} "
            "(apt-get install gcc curl openssh-client util-linux)",
            file=sys.stderr,
        )
        return 2
    rows = {
        "lat": Row("get round trip p50, one connection, same CPU", "µs", "≤ 1.0×"),
        "lat99": Row("get round trip p99, one connection, same CPU", "µs", "(reported)"),
        "tput": Row("throughput, 64 connections, C load generator", "req/s", "≥ 1.0×"),
        "pytput": Row("throughput, 64 connections, Python clients", "req/s", "≥ 1.2×"),
        "conn": Row("new connection per request, p50", "µs", "≤ 1.5×"),
        "ctl": Row("keyagent-ctl get vs ssh-add -l, whole process", "ms", "≤ 6×"),
        "rss": Row("RSS idle (two keys held)", "KiB", "≤ 5×"),
        "rssaudit": Row(
            "RSS with the audit ring full (10,000 entries, two keys held)", "KiB", "(reported)"
        ),
        "perkey": Row(
            "RSS per extra key (10,000 held, audit ring full)",
            "bytes",
            "≤ 1024 B",
            ratio_note="absolute",
        ),
        "hang": Row(
            "get p99 during a hung Conduce call (2nd column: no hang)",
            "µs",
            "≤ 2×",
            ratio_note="hang / no hang",
        ),
    }
    through = "through the agent / direct"
    http_rows = {
        "curl": Row(
            "one-shot curl, user/list-teams, whole process",
            "ms",
            "≤ 1.0×",
            ratio_note=through,
        ),
        "keepalive": Row(
            f"{http_socket.CLIENTS} keep-alive clients, user/list-teams",
            "req/s",
            "≥ 0.8×",
            ratio_note=through,
        ),
        "downloads": Row(
            f"get p99 during {http_socket.DOWNLOADS} proxied downloads (2nd column: idle)",
            "µs",
            "≤ 2×",
            ratio_note="downloads / idle",
        ),
    }
    list_sizes = [1000, 2500, 5000, 10000]
    list_ms: dict[int, list[float]] = {n: [] for n in list_sizes}

    with tempfile.TemporaryDirectory(prefix="keyagent-bench-") as tmp:
        workdir = Path(tmp)
        loadgen = workdir / "loadgen"
        run("cc", "-O2", "-o", str(loadgen), str(ROOT / "bench" / "loadgen.c"))
        lg = str(loadgen)
        http_note = measure_http_socket(workdir, lg, http_rows, args)
        if not args.http_only:
            measure_ssh_agent(workdir, lg, rows, list_ms, args)

    print_table(rows, list_ms, http_rows, http_note, args)
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, list_ms, http_rows, http_note, args))
    return 0


def measure_ssh_agent(
    workdir: Path,
    lg: str,
    rows: dict[str, Row],
    list_ms: dict[int, list[float]],
    args: argparse.Namespace,
) -> None:
    """The first table: keyagent against ssh-agent."""
    n_lat = 5000 if args.quick else 30000
    n_conn = 500 if args.quick else 3000
    secs = 1.0 if args.quick else 2.0
    runs = 10 if args.quick else 30
    cpus = os.cpu_count() or 1
    list_sizes = list(list_ms)
    with installed_ctl(workdir) as ctl, ssh_agent(workdir) as (ssh_sock, ssh_pid):
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            with keyagent(workdir) as agent:
                ka_sock, ka_pid = agent.socket_path, agent.pid
                # Latency: both agents and the client on CPU 0.
                pin(ssh_pid, 0)
                pin(ka_pid, 0)
                ka = parse(run("taskset", "-c", "0", lg, "lat", "ka", ka_sock, str(n_lat)))
                ssh = parse(run("taskset", "-c", "0", lg, "lat", "ssh", ssh_sock, str(n_lat)))
                rows["lat"].add(ka["p50"] / 1000, ssh["p50"] / 1000)
                rows["lat99"].add(ka["p99"] / 1000, ssh["p99"] / 1000)
                # Throughput and new connections: agent on CPU 0, clients on the rest.
                client_cpus = f"1-{cpus - 1}" if cpus > 1 else "0"
                ka = parse(
                    run("taskset", "-c", client_cpus, lg, "tput", "ka", ka_sock, "64", str(secs))
                )
                ssh = parse(
                    run(
                        "taskset",
                        "-c",
                        client_cpus,
                        lg,
                        "tput",
                        "ssh",
                        ssh_sock,
                        "64",
                        str(secs),
                    )
                )
                rows["tput"].add(ka["rps"], ssh["rps"])
                rows["pytput"].add(
                    python_client_rps("ka", ka_sock, 32, secs),
                    python_client_rps("ssh", ssh_sock, 32, secs),
                )
                ka = parse(run(lg, "conn", "ka", ka_sock, str(n_conn)))
                ssh = parse(run(lg, "conn", "ssh", ssh_sock, str(n_conn)))
                rows["conn"].add(ka["p50"] / 1000, ssh["p50"] / 1000)
                pin(ssh_pid, 0) if cpus == 1 else run(
                    "taskset", "-pc", f"0-{cpus - 1}", str(ssh_pid)
                )
                env_ka = {**os.environ, "KEYAGENT_SOCK": ka_sock}
                env_ssh = {**os.environ, "SSH_AUTH_SOCK": ssh_sock}
                ours = whole_process_ms([ctl, "get"], env_ka, runs)
                theirs = whole_process_ms(["ssh-add", "-l"], env_ssh, runs)
                rows["ctl"].add(ours, theirs)
            with keyagent(workdir) as agent:
                idle = rss_kib(agent.pid)
                rows["rss"].add(idle, rss_kib(ssh_pid))
                with agent.client() as client:
                    # The audit ring is a bounded cost of its own (10,000 entries by default):
                    # fill it first, so that the per-key figure is what each key adds, not
                    # the ring growing to its bound with the adds' entries.
                    for _ in range(AUDIT_RING):
                        with contextlib.suppress(KeyagentError):
                            client.get(key_id="ffffffff")
                    idle = rss_kib(agent.pid)
                    rows["rssaudit"].add(idle, rss_kib(ssh_pid))
                    # Measured before any list: a 10,000-key list reply is megabytes of
                    # JSON whose freed heap stays in RSS, which is not what a key costs.
                    for n in range(max(list_sizes)):
                        client.add("h.example", "u@example.com", f"k-{n:08d}-pad")
                    held = rss_kib(agent.pid)
                    rows["perkey"].add((held - idle) * 1024 / max(list_sizes))
            with keyagent(workdir) as agent, agent.client() as client:
                for size in list_sizes:
                    while len(client.list()) < size:
                        for n in range(len(client.list()), size):
                            client.add("h.example", "u@example.com", f"k-{n:08d}-pad")
                    samples = []
                    for _ in range(5):
                        started = time.perf_counter()
                        client.list()
                        samples.append((time.perf_counter() - started) * 1000)
                    list_ms[size].append(statistics.median(samples))
            rows["hang"].add(*hang_ratio(workdir, lg, n_lat))


def measure_http_socket(
    workdir: Path, loadgen: str, rows: dict[str, Row], args: argparse.Namespace
) -> str | None:
    """The second table: calls through the agent's HTTP socket against direct calls to the
    emulator (see bench/http_socket.py). Returns why it was skipped, or None."""
    runs = 10 if args.quick else 30
    secs = 1.0 if args.quick else 2.0
    samples = 2000 if args.quick else 10000
    with http_socket.emulator() as (emu, key):
        if args.emulator_nice:
            http_socket.lower_priority(emu.pid, args.emulator_nice)
        key_file, header_file = http_socket.write_key_files(workdir, key)
        for rep in range(args.reps):
            print(f"HTTP socket, repetition {rep + 1}/{args.reps}", file=sys.stderr)
            with keyagent(workdir, "--ca-bundle", emu.ca_path) as agent:
                try:
                    sock = http_socket.http_socket(agent)
                except http_socket.NoHttpSocket as skipped:
                    print(skipped, file=sys.stderr)
                    return str(skipped)
                with agent.client() as client:
                    client.add(emu.host, http_socket.USER, key)
                rows["curl"].add(*http_socket.one_shot_curl(sock, emu, header_file, runs))
                rows["keepalive"].add(*http_socket.keep_alive_rps(sock, emu, key_file, secs))
                rows["downloads"].add(
                    *http_socket.get_p99_during_downloads(sock, agent, emu, loadgen, samples)
                )
    return None


def hang_ratio(workdir: Path, loadgen: str, samples: int) -> tuple[float, float]:
    """get p99 with a Conduce call hung in the emulator, and without (µs)."""
    from keyagent.testing.emulator import ConduceEmulator, Fault

    with ConduceEmulator() as emu:
        emu.add_user("bench@example.com", "pw")
        with keyagent(workdir, "--ca-bundle", emu.ca_path) as agent:
            with agent.client() as client:
                client.login(emu.host, "bench@example.com", "pw")
            before = parse(run(loadgen, "lat", "ka", agent.socket_path, str(samples)))
            emu.inject(Fault.hang(), path="apikeys/list")
            caller = threading.Thread(
                target=lambda: _quiet(
                    lambda: Client(agent.socket_path).call(
                        "list", host=emu.host, user="bench@example.com", remote=True
                    )
                )
            )
            caller.start()
            emu.wait_for_hung(1, timeout=10)
            during = parse(run(loadgen, "lat", "ka", agent.socket_path, str(samples)))
            emu.clear_faults()
            emu.release()
            caller.join(10)
    return during["p99"] / 1000, before["p99"] / 1000


def _quiet(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # the hung call's outcome is not measured
        call()


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ssh_version = subprocess.run(
        ["ssh", "-V"], capture_output=True, text=True, check=False
    ).stderr.strip()
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {ssh_version}"
    )


def table_lines(rows: dict[str, Row], columns: str = "keyagent | ssh-agent") -> list[str]:
    lines = [
        f"| figure | {columns} | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows.values():
        digits = 0 if row.unit in {"req/s", "KiB", "bytes"} else 1
        ratio = (spread(row.ratios(), 2) + "×") if row.theirs else "-"
        lines.append(
            f"| {row.name} ({row.unit}) | {spread(row.ours, digits)} | "
            f"{spread(row.theirs, digits)} | {ratio} | {row.target} |"
        )
    return lines


def list_lines(list_ms: dict[int, list[float]]) -> list[str]:
    lines = ["| keys held | `list` (ms, median) | µs per key |", "| --- | --- | --- |"]
    for size, values in list_ms.items():
        med = statistics.median(values)
        lines.append(f"| {size:,} | {spread(values, 2)} | {med * 1000 / size:.2f} |")
    return lines


HTTP_COLUMNS = "through the agent | direct"


def http_lines(http_rows: dict[str, Row], http_note: str | None) -> list[str]:
    """The HTTP-socket table, or the reason it was skipped."""
    if http_note is not None:
        return [http_note]
    return [
        "HTTP socket: ratio = through the agent / direct (last row: downloads / idle)",
        "",
        *table_lines(http_rows, HTTP_COLUMNS),
    ]


def print_table(
    rows: dict[str, Row],
    list_ms: dict[int, list[float]],
    http_rows: dict[str, Row],
    http_note: str | None,
    args: argparse.Namespace,
) -> None:
    print(machine())
    print(f"{args.reps} repetitions; median (min-max); ratios computed within each repetition")
    if not args.http_only:
        print("ratio = keyagent / ssh-agent")
        print("\n".join(table_lines(rows)))
        print()
        print("\n".join(list_lines(list_ms)))
        print()
    print("\n".join(http_lines(http_rows, http_note)))


def markdown(
    rows: dict[str, Row],
    list_ms: dict[int, list[float]],
    http_rows: dict[str, Row],
    http_note: str | None,
    args: argparse.Namespace,
) -> str:
    flags = (" --quick" if args.quick else "") + (" --http-only" if args.http_only else "")
    flags += f" --emulator-nice {args.emulator_nice}" if args.emulator_nice else ""
    ssh_tables = [] if args.http_only else [*table_lines(rows), "", *list_lines(list_ms), ""]
    return "\n".join(
        [
            f"Machine: {machine()}",
            "",
            f"Command: `python bench/run.py --reps {args.reps}{flags}`",
            "",
            *ssh_tables,
            *http_lines(http_rows, http_note),
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
