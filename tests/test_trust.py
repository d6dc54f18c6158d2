"""keyagent.trust: configuration files and CA bundles that another user could change are refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from keyagent.config import ConfigError, load
from keyagent.trust import UntrustedFile, check_trusted, read_ca_bundle

from .conftest import NOBODY, run_ctl_process

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another user (chown) needs root"
)


@pytest.fixture
def safe(tmp_path: Path) -> Path:
    """A directory only root can change, under pytest's own (also private) temporary tree."""
    directory = tmp_path / "safe"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def bundle_pem() -> bytes:
    return trustme.CA().cert_pem.bytes()


@pytest.fixture
def config_env(safe: Path) -> dict[str, str]:
    """An environment for keyagent-ctl and keyagent with no agent and no inherited config."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KEYAGENT_") and key != "XDG_CONFIG_HOME"
    }
    env["XDG_CONFIG_HOME"] = str(safe / "xdg")
    env["KEYAGENT_SOCK"] = str(safe / "no-agent.sock")
    return env


def write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    path.chmod(mode)
    return path


# --- the rule ----------------------------------------------------------------------------------


def test_pytest_temporary_directories_pass_the_rule(tmp_path: Path) -> None:
    """tmp_path (under /tmp, sticky and root-owned, then private directories) is trusted."""
    info = check_trusted(str(write(tmp_path / "f", "x")))
    assert stat.S_ISREG(info.st_mode)


@pytest.mark.parametrize(
    ("mode", "whom", "fix"),
    [
        (0o620, "its group", "g-w"),
        (0o602, "every user", "o-w"),
        (0o666, "its group and every user", "go-w"),
    ],
)
def test_a_file_writable_by_group_or_others_is_refused(
    safe: Path, mode: int, whom: str, fix: str
) -> None:
    """Group or other write permission on the file itself is refused, with the chmod named."""
    path = write(safe / "config.toml", "", mode)
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(path), harm="point ca_bundle at their own CA")
    assert caught.value.message == (
        f"{path}: is writable by {whom}, who could point ca_bundle at their own CA;"
        f" run chmod {fix} {path}"
    )


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o775])
def test_a_directory_on_the_path_writable_by_group_or_others_is_refused(
    safe: Path, mode: int
) -> None:
    """A directory others can write lets them replace the file: refused, naming it."""
    directory = safe / "conf"
    directory.mkdir()
    path = write(directory / "config.toml", "")
    directory.chmod(mode)
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(path))
    message = caught.value.message
    assert message.startswith(f"{path}: the directory {directory} on its path is writable by")
    assert "run chmod " in message
    assert str(directory) in message.split("run chmod ")[1]


def test_a_file_of_another_user_is_refused(safe: Path) -> None:
    """A file owned by someone else (not root) is refused, naming the owner."""
    path = write(safe / "ca.pem", "")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UntrustedFile, match=rf"belongs to another user \(uid {NOBODY}\b"):
        check_trusted(str(path))


def test_a_directory_of_another_user_is_refused(safe: Path) -> None:
    """A private-looking (0700) directory that belongs to another user is refused too."""
    directory = safe / "theirs"
    directory.mkdir(mode=0o700)
    path = write(directory / "ca.pem", "")
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(path))
    assert f"the directory {directory} on its path belongs to another user" in str(caught.value)


def test_a_link_to_a_file_in_an_open_directory_is_refused(safe: Path) -> None:
    """A symbolic link is followed, and the target's directories are checked too."""
    open_dir = safe / "open"
    open_dir.mkdir()
    target = write(open_dir / "ca.pem", "")
    open_dir.chmod(0o777)  # not sticky
    link = safe / "ca.pem"
    link.symlink_to(target)
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(link))
    assert f"the directory {open_dir} on its path is writable by" in str(caught.value)


def test_every_directory_of_a_chain_of_links_is_checked(safe: Path) -> None:
    """A link found through another link: the directory holding the second one counts too."""
    middle = safe / "middle"
    middle.mkdir()
    target = write(safe / "ca.pem", "")
    (middle / "second").symlink_to(target)
    middle.chmod(0o777)
    first = safe / "first"
    first.symlink_to(middle / "second")
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(first))
    assert f"the directory {middle} on its path is writable" in str(caught.value)


def test_a_link_of_another_user_is_refused(safe: Path) -> None:
    """A symbolic link that belongs to another user is refused, even to a safe file."""
    target = write(safe / "ca.pem", "")
    link = safe / "link.pem"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(UntrustedFile) as caught:
        check_trusted(str(link))
    assert f"the symbolic link {link} on its path belongs to another user" in str(caught.value)


def test_a_safe_link_to_a_safe_file_is_trusted(safe: Path) -> None:
    """Links are fine as such: only who can change them, or what they lead to, matters."""
    target = write(safe / "ca.pem", "x")
    link = safe / "link.pem"
    link.symlink_to("ca.pem")  # relative
    assert check_trusted(str(link)).st_ino == target.stat().st_ino


def test_a_sticky_root_directory_like_tmp_is_accepted_for_entries_of_the_user(
    safe: Path,
) -> None:
    """In a sticky root-owned 1777 directory others cannot replace our entries: trusted;
    an entry there that belongs to another user is still refused."""
    shared = safe / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    mine = write(shared / "mine.pem", "")
    check_trusted(str(mine))
    theirs = write(shared / "theirs.pem", "")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UntrustedFile, match="belongs to another user"):
        check_trusted(str(theirs))
    shared.chmod(0o777)  # the same directory without the sticky bit
    with pytest.raises(UntrustedFile, match=f"the directory {shared} on its path is writable"):
        check_trusted(str(mine))


def test_read_ca_bundle_refuses_what_is_not_a_pem_bundle(safe: Path, bundle_pem: bytes) -> None:
    """A bundle must hold PEM certificates OpenSSL accepts; a good one comes back as text."""
    good = write(safe / "good.pem", bundle_pem)
    assert read_ca_bundle(str(good)) == bundle_pem.decode()
    with pytest.raises(UntrustedFile, match="holds no PEM certificate"):
        read_ca_bundle(str(write(safe / "empty.pem", "")))
    with pytest.raises(UntrustedFile, match="cannot be read"):
        read_ca_bundle(str(safe / "missing.pem"))


# --- the configuration file: keyagent-ctl and KEYAGENT_CONFIG -----------------------------------


def test_a_group_writable_config_file_is_refused(safe: Path) -> None:
    """config.toml writable by its group (not only by everyone) is refused."""
    path = write(safe / "config.toml", 'host = "h.example"\n', 0o660)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}: is writable by its group, who could point ca_bundle at their own CA;"
        f" run chmod g-w {path}"
    )
    assert caught.value.path == str(path)


def test_a_config_file_in_a_directory_of_another_user_is_refused(safe: Path) -> None:
    """A config file of the user's own, in a directory another user owns, is refused."""
    directory = safe / "keyagent"
    directory.mkdir(mode=0o755)
    path = write(directory / "config.toml", 'host = "h.example"\n')
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"the directory {directory} on its path belongs"):
        load(str(path), env={})


def test_keyagent_config_naming_an_unsafe_file_exits_78(
    safe: Path, config_env: dict[str, str]
) -> None:
    """keyagent-ctl with KEYAGENT_CONFIG naming a group-writable file exits 78, naming it."""
    path = write(safe / "config.toml", 'host = "h.example"\n', 0o664)
    result = run_ctl_process(["config"], env={**config_env, "KEYAGENT_CONFIG": str(path)})
    assert result.returncode == 78, result.stderr
    assert f"{path}: is writable by its group" in result.stderr
    assert f"chmod g-w {path}" in result.stderr


def test_the_default_config_file_in_an_unsafe_directory_exits_78(
    safe: Path, config_env: dict[str, str]
) -> None:
    """The file at the default location is held to the same rule as a named one."""
    directory = safe / "xdg" / "keyagent"
    directory.mkdir(parents=True)
    write(directory / "config.toml", 'host = "h.example"\n')
    directory.chmod(0o777)
    result = run_ctl_process(["config"], env=config_env)
    assert result.returncode == 78, result.stderr
    assert f"the directory {directory} on its path is writable by" in result.stderr


# --- the CA bundle: the daemon -------------------------------------------------------------------


def test_an_unsafe_config_file_stops_the_daemon_with_78(
    safe: Path, config_env: dict[str, str]
) -> None:
    """keyagent itself exits 78 (EX_CONFIG) on a config file another user could change."""
    run = safe / "run"
    run.mkdir(mode=0o700)
    path = write(safe / "config.toml", 'host = "h.example"\n', 0o666)
    result = subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "-a", str(run / "agent.sock")],
        capture_output=True, text=True, timeout=30, check=False,
        env={**config_env, "KEYAGENT_CONFIG": str(path)},
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert f"{path}: is writable by" in result.stderr
    assert not (run / "agent.sock").exists()


def start_daemon(safe: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    run = safe / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "keyagent.daemon", "-D", "-a", str(run / "agent.sock"), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def test_a_requests_ca_bundle_of_another_user_stops_the_daemon_with_78(
    safe: Path, config_env: dict[str, str], bundle_pem: bytes
) -> None:
    """REQUESTS_CA_BUNDLE is held to the --ca-bundle rules: another user's file is refused."""
    bundle = write(safe / "ca.pem", bundle_pem, 0o666)
    os.chown(bundle, NOBODY, NOBODY)
    result = start_daemon(safe, {**config_env, "REQUESTS_CA_BUNDLE": str(bundle)})
    assert result.returncode == 78, result.stderr
    assert f"CA bundle ($REQUESTS_CA_BUNDLE) {bundle}: belongs to another user" in result.stderr


def test_a_ca_bundle_of_another_user_stops_the_daemon_with_78(
    safe: Path, config_env: dict[str, str], bundle_pem: bytes
) -> None:
    """--ca-bundle naming a 0666 file of another user: exit 78 naming it, no socket bound."""
    bundle = write(safe / "ca.pem", bundle_pem, 0o666)
    os.chown(bundle, NOBODY, NOBODY)
    result = start_daemon(safe, config_env, "--ca-bundle", str(bundle))
    assert result.returncode == 78, result.stderr
    assert f"keyagent: CA bundle {bundle}: belongs to another user" in result.stderr
    assert not (safe / "run" / "agent.sock").exists()


def test_a_group_writable_ca_bundle_from_the_config_file_stops_the_daemon_with_78(
    safe: Path, config_env: dict[str, str], bundle_pem: bytes
) -> None:
    """ca_bundle in the config file is held to the same rule as --ca-bundle."""
    bundle = write(safe / "ca.pem", bundle_pem, 0o660)
    config = write(safe / "config.toml", f'ca_bundle = "{bundle}"\n')
    result = start_daemon(safe, {**config_env, "KEYAGENT_CONFIG": str(config)})
    assert result.returncode == 78, result.stderr
    assert f"keyagent: CA bundle {bundle}: is writable by its group" in result.stderr


def test_a_ca_bundle_that_is_not_pem_stops_the_daemon_with_78(
    safe: Path, config_env: dict[str, str]
) -> None:
    """A bundle with no certificate in it is a configuration error at start, not later."""
    bundle = write(safe / "ca.pem", "hello\n")
    result = start_daemon(safe, config_env, "--ca-bundle", str(bundle))
    assert result.returncode == 78, result.stderr
    assert "holds no PEM certificate" in result.stderr
