"""Running the askpass program, and reading a peer's executable (real processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from keyagent import errors
from keyagent.askpass import STOPPING, Dialogs, _polled_exit, printable
from keyagent.sockets import peer_exe
from keyagent.testing.agent import wait_for_exit

from .conftest import wait_until


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return str(path)


def test_exit_status_zero_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that exits 0 allows; it got the question as its one argument, stdin empty,
    and an environment with SSH_ASKPASS_PROMPT=confirm and no other variable of ours."""
    record = tmp_path / "record"
    program = script(
        tmp_path,
        "ask",
        f'printf "%s|%s|%s|" "$#" "$1" "$SSH_ASKPASS_PROMPT" > {record}\n'
        f"cat >> {record}\nenv >> {record}\nexit 0\n",
    )
    monkeypatch.setenv("KEYAGENT_TEST_UNRELATED", "leak")
    Dialogs().ask(program, "Allow /usr/bin/curl (pid 1)?", 10.0)
    text = record.read_text()
    assert text.startswith("1|Allow /usr/bin/curl (pid 1)?|confirm|")
    assert "KEYAGENT_TEST_UNRELATED" not in text


def test_a_non_zero_exit_is_a_refusal(tmp_path: Path) -> None:
    """Exit status 1 (ssh-askpass's "no") is denied as a refusal."""
    with pytest.raises(errors.Denied) as caught:
        Dialogs().ask(script(tmp_path, "no", "exit 1\n"), "q", 10.0)
    assert "refused" in caught.value.message


def test_a_program_that_cannot_run_is_denied_naming_it(tmp_path: Path) -> None:
    """A missing program is denied with its path and how to set another."""
    missing = str(tmp_path / "missing")
    with pytest.raises(errors.Denied) as caught:
        Dialogs().ask(missing, "q", 10.0)
    assert missing in caught.value.message
    assert "KEYAGENT_ASKPASS" in caught.value.message


def test_no_answer_in_time_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A program that hangs is denied after the timeout, and it and its children are killed."""
    pids = tmp_path / "pids"
    program = script(tmp_path, "hang", f"sleep 300 &\necho $$ $! > {pids}\nwait\n")
    with pytest.raises(errors.Denied) as caught:
        Dialogs().ask(program, "q", 1.0)
    assert "within 1 s" in caught.value.message
    for pid in map(int, pids.read_text().split()):
        assert wait_for_exit(pid, 10)


def test_helpers_an_allowing_program_leaves_behind_are_killed(tmp_path: Path) -> None:
    """A program that allows but leaves a process running in its group: that process is
    killed, not left to outlive the question."""
    pids = tmp_path / "pids"
    program = script(tmp_path, "left", f"sleep 300 &\necho $! > {pids}\nexit 0\n")
    Dialogs().ask(program, "q", 10.0)
    assert wait_for_exit(int(pids.read_text()), 10)


def test_closing_ends_open_dialogs_whole_and_refuses_new_ones(tmp_path: Path) -> None:
    """close() (the agent stopping) kills a program still asking, with its children; its
    question is refused as the agent stopping, and a later one is refused without running
    the program."""
    pids = tmp_path / "pids"
    program = script(tmp_path, "hang", f"sleep 300 &\necho $$ $! > {pids}.new\n"
                     f"mv {pids}.new {pids}\nwait\n")  # fmt: skip
    dialogs = Dialogs()
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            dialogs.ask(program, "q", 300.0)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001  # handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        wait_until(pids.exists, "the program asks", pause=0.01)
        dialogs.close()
    finally:
        thread.join(30)
    (error,) = outcome
    assert isinstance(error, errors.Denied)
    assert error.message == STOPPING
    for pid in map(int, pids.read_text().split()):
        assert wait_for_exit(pid, 10)
    pids.unlink()
    with pytest.raises(errors.Denied) as caught:
        dialogs.ask(program, "q", 300.0)
    assert caught.value.message == STOPPING
    assert not pids.exists()


def test_an_exit_is_seen_by_polling_where_pidfd_open_is_missing() -> None:
    """The fallback for kernels without pidfd_open: it times out on a running child, sees
    its exit, and leaves it unreaped (its pid still names it) for the caller to reap."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert not _polled_exit(child.pid, 0.1)
        assert child.stdin is not None
        child.stdin.close()
        assert _polled_exit(child.pid, 30.0)
        assert Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z"
    finally:
        child.wait()
    assert child.returncode == 0


def test_printable_drops_control_and_format_characters() -> None:
    """Terminal escapes, bidi overrides and newlines never reach the question."""
    shown = printable("a\x1b[31mb\u202ec\nd\te", 100)
    assert shown.isprintable()
    assert shown == "a[31mbc d e"
    assert len(printable("x" * 500, 20)) == 20


def test_peer_exe_names_a_running_program_and_none_once_it_exited() -> None:
    """peer_exe reads /proc/PID/exe; an exited process (or pid 0) gives None."""
    assert peer_exe(os.getpid()) == os.path.realpath(sys.executable)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert peer_exe(child.pid) is None
    assert peer_exe(0) is None


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare, as root"
)
def test_peer_exe_of_a_program_mounted_over_an_allowed_path_is_unknown(tmp_path: Path) -> None:
    """A process in a mount namespace of its own, running one program bind-mounted over
    another's path, names that path in /proc/PID/exe: peer_exe checks it is the same file
    here, and says unknown when it is not (so --allow-exe refuses it)."""
    target = tmp_path / "allowed"
    target.write_bytes(b"#!/bin/sh\n")
    python = os.path.realpath(sys.executable)
    script = "import sys; sys.stdin.read()"
    mounted = f'mount --bind "$1" "$2" && exec "$2" -c "{script}"'
    child = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", mounted, "sh", python, str(target)], stdin=subprocess.PIPE
    )
    try:
        wait_until(lambda: _readlink(child.pid) == str(target), "the child runs", pause=0.01)
        assert peer_exe(child.pid) is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert child.returncode == 0  # the mount worked: the check above saw what it was for


def _readlink(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def test_peer_exe_of_a_replaced_program_never_equals_its_path(tmp_path: Path) -> None:
    """When the file a process runs is deleted, its path gains ' (deleted)'."""
    copy = tmp_path / "python-copy"
    copy.write_bytes(Path(os.path.realpath(sys.executable)).read_bytes())
    copy.chmod(0o700)
    child = subprocess.Popen([str(copy), "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert peer_exe(child.pid) == str(copy)
        copy.unlink()
        assert peer_exe(child.pid) == f"{copy} (deleted)"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def test_a_question_is_asked_with_more_descriptors_open_than_select_takes() -> None:
    """A busy agent has over 1,024 descriptors open (max_connections is 1024): waiting for
    the askpass program must not use select(), which refuses a descriptor past 1023."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard descriptor limit ({hard}) is below what the test needs")
    probe = (
        "import os, resource, sys\n"
        "from keyagent.askpass import Dialogs\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1200, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n"
        "held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]\n"
        "assert max(held) > 1024\n"
        "Dialogs().ask('/bin/true', 'q', 30.0)\n"
        "print('allowed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "allowed\n"
