"""The leftovers file on its own: atomic 0600 writes in a private directory, and reading it
back as untrusted input (bad JSON, wrong owner or mode, a symlink, a crash mid-write)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from keyagent import paths
from keyagent.leftovers import Leftover, LeftoversFile
from keyagent.store import digest_of

NOBODY = 65534
FIRST = Leftover(digest_of("first-S3CR3T-key-000"), "app.conduce.com", "ada@example.com", 1.7e9)
SECOND = Leftover(digest_of("second-S3CR3T-key-00"), "eu.conduce.com", "bob@example.com", None)


@pytest.fixture
def leftovers(tmp_path: Path) -> LeftoversFile:
    return LeftoversFile(str(tmp_path / "state" / "keyagent" / "leftovers-0123.json"))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_written_entries_read_back_from_a_0600_file_in_a_0700_directory(
    leftovers: LeftoversFile,
) -> None:
    """write makes the directory 0700 (parents too) and the file 0600; read gives the entries
    back."""
    assert leftovers.write([FIRST, SECOND]) is True
    assert stat.S_IMODE(os.stat(leftovers.directory).st_mode) == 0o700
    info = os.stat(leftovers.path)
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.geteuid())
    assert leftovers.read() == [FIRST, SECOND]
    document = json.loads(Path(leftovers.path).read_text())
    assert document["v"] == 1
    assert document["keys"][0] == {
        "fingerprint": FIRST.fingerprint, "host": FIRST.host, "user": FIRST.user,
        "expires": FIRST.expires,
    }  # fmt: skip


def test_nothing_to_record_removes_the_file(leftovers: LeftoversFile) -> None:
    """Writing no entries removes the file, and a missing file reads as empty."""
    leftovers.write([FIRST])
    assert leftovers.write([]) is True
    assert not os.path.exists(leftovers.path)
    assert leftovers.read() == []
    assert leftovers.write([]) is True  # nothing there: still fine


def test_a_crash_mid_write_leaves_the_good_file_readable(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale temporary file and a truncated one beside the good file (a writer killed before
    its rename) are ignored by the reader, which removes them; the good file reads back."""
    leftovers.write([FIRST])
    directory = Path(leftovers.directory)
    stale = directory / f".{leftovers.name}.4242.0badc0de.tmp"
    stale.write_text("")
    truncated = directory / f".{leftovers.name}.4243.0badc0df.tmp"
    truncated.write_text('{"v":1,"keys":[{"fingerprint":"')
    unrelated = directory / ".leftovers-other.json.1.2.tmp"
    unrelated.write_text("")
    with caplog.at_level(logging.INFO, logger="keyagent.leftovers"):
        assert leftovers.read() == [FIRST]
    assert not stale.exists()
    assert not truncated.exists()
    assert unrelated.exists()  # another socket's file: not this reader's to remove
    assert warnings(caplog) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails half-way (here: the rename, onto a directory) keeps the previous file
    intact and removes its temporary file; it is logged, not raised."""
    leftovers.write([FIRST])
    blocked = LeftoversFile(os.path.join(leftovers.directory, "blocked.json"))
    os.mkdir(blocked.path)
    os.mkdir(os.path.join(blocked.path, "inside"))  # rename() cannot replace a full directory
    assert blocked.write([SECOND]) is False
    assert sorted(os.listdir(leftovers.directory)) == sorted([leftovers.name, "blocked.json"])
    assert leftovers.read() == [FIRST]
    assert any(blocked.path in message for message in warnings(caplog))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b'["v", 1]', '"keys" list'),
        (b'{"v": 2, "keys": []}', "format 2"),
        (b'{"v": true, "keys": []}', "format True"),
    ],
)
def test_a_file_that_does_not_parse_is_ignored_with_a_warning(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    """Bad JSON or the wrong shape reads as empty, with a warning naming the file, the problem
    and what to do; never an exception."""
    leftovers.write([FIRST])
    Path(leftovers.path).write_bytes(content)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert leftovers.path in message
    assert problem in message
    assert "keyagent-ctl list --remote" in message


def test_entries_of_the_wrong_kind_are_skipped(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries with a bad fingerprint, host, user or expiry are skipped (counted in a warning);
    good ones load, unknown members are ignored, a repeated fingerprint counts once."""
    good = {"fingerprint": FIRST.fingerprint, "host": FIRST.host, "user": FIRST.user,
            "expires": FIRST.expires, "future": "ignored"}  # fmt: skip
    bad = [
        "not an object",
        {**good, "fingerprint": "ABC"},
        {**good, "fingerprint": FIRST.fingerprint.upper()},
        {**good, "host": "bad host\n"},
        {**good, "host": 7},
        {**good, "user": ""},
        {**good, "expires": "tomorrow"},
        {**good, "expires": True},
        {**good, "expires": float("inf")},
        {**good, "expires": 10**400},  # no float holds it: math.isfinite raised OverflowError
    ]
    document = {"v": 1, "keys": [*bad, good, {**good, "user": "other@example.com"}]}
    Path(leftovers.directory).mkdir(parents=True, mode=0o700)
    fd = os.open(leftovers.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(document).replace("Infinity", "1e999").encode())
    os.close(fd)
    assert leftovers.read() == [FIRST]
    (message,) = warnings(caplog)
    assert f"skipped {len(bad)} unreadable entries" in message


def test_a_symlink_is_not_followed(
    leftovers: LeftoversFile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlink in the file's place is not read (O_NOFOLLOW); a write replaces the link
    itself, never the file it points to."""
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"v": 1, "keys": []}))
    target.chmod(0o600)
    Path(leftovers.directory).mkdir(parents=True, mode=0o700)
    os.symlink(target, leftovers.path)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert "symbolic link" in message
    assert leftovers.path in message
    assert leftovers.write([FIRST]) is True
    assert not os.path.islink(leftovers.path)
    assert json.loads(target.read_text()) == {"v": 1, "keys": []}


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_a_file_of_another_user_is_ignored(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A leftovers file owned by another user is not trusted."""
    leftovers.write([FIRST])
    os.chown(leftovers.path, NOBODY, NOBODY)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert f"owned by uid {NOBODY}" in message


def test_a_file_others_can_read_or_write_is_ignored(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A leftovers file with group or other permissions is not trusted (someone else may have
    written it). It is moved aside, not left for the agent's next write to replace: the
    warning tells the user to check what it names, then delete it, where it now is."""
    leftovers.write([FIRST])
    written = Path(leftovers.path).read_bytes()
    os.chmod(leftovers.path, 0o644)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert "mode 0644" in message
    aside = leftovers.path + ".ignored"
    assert not os.path.exists(leftovers.path)
    assert Path(aside).read_bytes() == written
    assert f"it is now {aside}." in message
    assert message.endswith(f"then delete {aside}")
    assert leftovers.write([]) is True  # the agent's own first write leaves it alone
    assert Path(aside).read_bytes() == written
    leftovers.write([FIRST])  # ignored again at the next start: the first stays as it was
    os.chmod(leftovers.path, 0o640)
    assert leftovers.read() == []
    assert Path(aside).read_bytes() == written
    assert Path(aside + ".2").read_bytes() == written


def test_a_fifo_in_the_files_place_does_not_block(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO where the file should be is refused at once (opened non-blocking), not read."""
    Path(leftovers.directory).mkdir(parents=True, mode=0o700)
    os.mkfifo(leftovers.path, 0o600)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert "not a regular file" in message


def test_a_directory_others_can_enter_is_refused_for_writing(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory must be the user's alone: a group-accessible one is not written to, and
    the warning says how to fix it."""
    Path(leftovers.directory).mkdir(parents=True, mode=0o700)
    os.chmod(leftovers.directory, 0o750)
    assert leftovers.write([FIRST]) is False
    assert not os.path.exists(leftovers.path)
    (message,) = warnings(caplog)
    assert f"chmod 700 {leftovers.directory}" in message


def test_the_path_is_per_socket_under_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file lives in $XDG_STATE_HOME/keyagent, named after the socket's absolute path: the
    same socket gives the same file, two sockets two files."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    one = paths.leftovers_path(str(tmp_path / "a" / "agent.sock"))
    assert os.path.dirname(one) == str(tmp_path / "xdg" / "keyagent")
    assert os.path.basename(one).startswith("leftovers-")
    assert paths.leftovers_path(str(tmp_path / "a" / "agent.sock")) == one
    assert paths.leftovers_path("a/agent.sock") == one  # relative: the same socket
    assert paths.leftovers_path(str(tmp_path / "b" / "agent.sock")) != one


def test_the_repr_shows_no_more_than_a_key_id() -> None:
    """A Leftover's repr names the key by its short id, never the whole fingerprint."""
    assert FIRST.fingerprint not in repr(FIRST)
    assert FIRST.fingerprint[:12] in repr(FIRST)


def test_a_directory_others_can_write_to_is_not_read(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A file in a directory that group or others may write to is not trusted, and nothing
    in that directory is removed."""
    leftovers.write([FIRST])
    stale = Path(leftovers.directory) / f".{leftovers.name}.1.2.tmp"
    stale.write_text("")
    os.chmod(leftovers.directory, 0o777)
    assert leftovers.read() == []
    assert stale.exists()
    (message,) = warnings(caplog)
    assert f"chmod 700 {leftovers.directory}" in message


def test_a_sticky_directory_is_refused_without_advice_to_close_it(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A leftovers directory like /tmp (sticky, many users' own) is not trusted, and the
    advice is to choose another, never to chmod it."""
    leftovers.write([FIRST])
    os.chmod(leftovers.directory, 0o1777)
    assert leftovers.read() == []
    (message,) = warnings(caplog)
    assert "shared directory" in message
    assert "chmod" not in message


def directory_problem(directory: str, mode: int) -> str:
    return (
        f"the directory {directory} is accessible to group or others (mode {mode:04o});"
        f" run chmod 700 {directory}"
    )


def planted(directory: Path, name: str, entry: Leftover) -> Path:
    """A valid leftovers file of the caller's own, 0600, naming ``entry``, in ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    keys = [{"fingerprint": entry.fingerprint, "host": entry.host, "user": entry.user,
             "expires": entry.expires}]  # fmt: skip
    path.write_text(json.dumps({"v": 1, "keys": keys}))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "mode", [0o750, 0o740, 0o710, 0o705, 0o770, 0o720, 0o777], ids=lambda mode: f"{mode:04o}"
)
def test_a_directory_others_can_enter_is_refused_by_reader_and_writer_alike(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    """A directory with any group or other access (readable only, too) is refused by the
    reader and the writer with the same problem and the same chmod 700 fix; after the fix
    both work again."""
    leftovers.write([FIRST])
    before = Path(leftovers.path).read_bytes()
    os.chmod(leftovers.directory, mode)
    problem = directory_problem(leftovers.directory, mode)
    assert leftovers.read() == []
    assert leftovers.write([SECOND]) is False
    assert leftovers.write([]) is False  # nor is the file removed there
    read_warning, *write_warnings = warnings(caplog)
    assert read_warning.startswith(f"ignoring the leftovers file {leftovers.path}: {problem}.")
    assert write_warnings == [f"cannot record ephemeral keys in {leftovers.path}: {problem}"] * 2
    assert Path(leftovers.path).read_bytes() == before
    os.chmod(leftovers.directory, 0o700)
    assert leftovers.read() == [FIRST]
    assert leftovers.write([SECOND]) is True
    assert leftovers.read() == [SECOND]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
def test_a_directory_of_another_user_is_refused_by_reader_and_writer(
    leftovers: LeftoversFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0700 directory that belongs to another user is neither read nor written, with the
    same warning from both."""
    leftovers.write([FIRST])
    os.chown(leftovers.directory, NOBODY, NOBODY)
    assert leftovers.read() == []
    assert leftovers.write([SECOND]) is False
    problem = f"the directory {leftovers.directory} is owned by uid {NOBODY}, not by you"
    assert [problem in message for message in warnings(caplog)] == [True, True]
    assert leftovers.write([]) is False
    assert os.path.exists(leftovers.path)


def test_a_directory_that_is_a_symlink_is_refused(
    leftovers: LeftoversFile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlink in the directory's place, even to a private directory of the user's own, is
    not followed: nothing behind it is read, written or removed."""
    target = tmp_path / "private"
    behind = planted(target, leftovers.name, SECOND)
    stale = target / f".{leftovers.name}.1.2.tmp"
    stale.write_text("")
    Path(leftovers.directory).parent.mkdir(parents=True)
    os.symlink(target, leftovers.directory)
    before = behind.read_bytes()
    assert leftovers.read() == []
    assert leftovers.write([FIRST]) is False
    assert behind.read_bytes() == before
    assert sorted(os.listdir(target)) == sorted([leftovers.name, stale.name])
    messages = warnings(caplog)
    assert len(messages) == 2
    assert all(f"the directory {leftovers.directory} is a symbolic link" in m for m in messages)


def test_a_directory_swapped_for_a_symlink_later_is_refused(
    leftovers: LeftoversFile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory is checked at each read and write, not once: swapped for a symlink to
    another private directory after the first write, it is refused by both."""
    assert leftovers.write([FIRST]) is True
    moved = tmp_path / "moved"
    os.rename(leftovers.directory, moved)
    decoy = planted(tmp_path / "decoy", leftovers.name, SECOND)
    os.symlink(decoy.parent, leftovers.directory)
    assert leftovers.read() == []
    assert leftovers.write([FIRST, SECOND]) is False
    assert LeftoversFile(str(decoy)).read() == [SECOND]
    assert LeftoversFile(str(moved / leftovers.name)).read() == [FIRST]
    assert all("is a symbolic link" in message for message in warnings(caplog))


def swap_on_first_call(
    monkeypatch: pytest.MonkeyPatch, name: str, directory: str, replacement: Path
) -> None:
    """Make the first call of ``os.<name>`` first move ``directory`` aside (to
    ``directory``.moved) and put a symlink to ``replacement`` in its place: another user
    swapping the path in the middle of an operation."""
    real = getattr(os, name)
    calls: list[tuple[object, ...]] = []

    def swapping(*args: object, **kwargs: object) -> object:
        if not calls:
            calls.append(args)
            os.rename(directory, directory + ".moved")
            os.symlink(replacement, directory)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, swapping)


def test_a_write_stays_in_the_directory_it_checked(
    leftovers: LeftoversFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory swapped for a symlink after the check, while the temporary file is being
    written, does not redirect the write: the new file lands in the directory that was
    checked, nothing in the one swapped in."""
    assert leftovers.write([FIRST]) is True
    decoy = tmp_path / "decoy"
    decoy.mkdir(mode=0o700)
    swap_on_first_call(monkeypatch, "fsync", leftovers.directory, decoy)
    assert leftovers.write([SECOND]) is True
    monkeypatch.undo()
    assert os.listdir(decoy) == []
    checked = leftovers.directory + ".moved"
    assert os.listdir(checked) == [leftovers.name]
    assert LeftoversFile(os.path.join(checked, leftovers.name)).read() == [SECOND]


def test_a_read_stays_in_the_directory_it_checked(
    leftovers: LeftoversFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory swapped for a symlink after the check, while stale temporaries are being
    looked for, does not redirect the read: the file comes from the directory that was
    checked, not from the one swapped in."""
    assert leftovers.write([FIRST]) is True
    decoy = planted(tmp_path / "decoy", leftovers.name, SECOND).parent
    swap_on_first_call(monkeypatch, "listdir", leftovers.directory, decoy)
    assert leftovers.read() == [FIRST]


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_a_parent_others_can_write_to_cannot_lend_them_the_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a parent every user may write to (not sticky), the user's own private directory
    is used; another user who replaces it with a directory of theirs holding a planted file
    gets it refused by the reader and the writer (the owner check on the opened directory is
    what protects, so the parent itself is not refused)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    leftovers = LeftoversFile(str(shared / "keyagent" / "leftovers-0123.json"))
    assert leftovers.write([FIRST]) is True
    assert leftovers.read() == [FIRST]
    assert warnings(caplog) == []
    os.rename(leftovers.directory, shared / "theirs-moved-yours")
    theirs = planted(Path(leftovers.directory), leftovers.name, SECOND)
    os.chown(theirs, NOBODY, NOBODY)
    os.chown(leftovers.directory, NOBODY, NOBODY)
    assert leftovers.read() == []
    assert leftovers.write([FIRST]) is False
    assert [f"owned by uid {NOBODY}, not by you" in m for m in warnings(caplog)] == [True, True]
    assert json.loads(theirs.read_text())["keys"][0]["fingerprint"] == SECOND.fingerprint
