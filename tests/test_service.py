"""``keyagent-ctl service``: the units it renders, what it refuses, and a real user manager.

Rendering, ownership and refusals run anywhere (no systemctl is reached on those paths, or
none is running, which is itself a case). The rest runs ``keyagent-ctl service`` from a
virtualenv made for the test under /tmp (so ``PrivateTmp=`` would hide it) next to a real
``systemd --user``, through the ``user_manager`` fixture of test_systemd.py.
"""

from __future__ import annotations

import fnmatch
import io
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from keyagent import cli, service

from .test_systemd import (
    ROOT,
    SERVICE_UNIT,
    SOCKET_UNIT,
    UserManager,
    analyze,
    needs_analyze,
    needs_root,
    needs_user_manager,
    user_manager,
)

__all__ = ["user_manager"]  # the fixture, shared with test_systemd.py

MAX_EXPOSURE = 2.0
"""The issue's bound on ``systemd-analyze security`` for the unit install writes."""


def run_ctl(*argv: str) -> tuple[int, str, str]:
    """``keyagent-ctl ARGV`` through cli.main: status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stderr
    sys.stderr = err  # cmd_service reports failures on the process's stderr, as exec does
    try:
        status = cli.main(list(argv), stdout=out, stderr=err)
    finally:
        sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CONFIG_HOME in the test's directory, with no user manager to reach."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # empty: no manager listens there
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    return tmp_path / "config"


# --- the templates -------------------------------------------------------------------------


def test_packaged_units_are_the_contrib_units() -> None:
    """keyagent/units/ (what an installed keyagent renders) holds the same files as contrib/."""
    packaged = ROOT / "keyagent" / "units"
    assert sorted(path.name for path in packaged.iterdir()) == list(sorted(service.UNITS))
    for name in service.UNITS:
        assert (packaged / name).read_bytes() == (ROOT / "contrib" / "systemd" / name).read_bytes()
        assert service.template(name) == (ROOT / "contrib" / "systemd" / name).read_text()


def test_package_data_ships_the_units() -> None:
    """pyproject.toml's package data names every file in keyagent/units/ (wheels carry them)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["keyagent"]
    for name in service.UNITS:
        assert any(fnmatch.fnmatch(f"units/{name}", pattern) for pattern in patterns), patterns


# --- rendering -----------------------------------------------------------------------------


def test_print_shows_the_units_for_this_installation(config_home: Path) -> None:
    """install --print writes both marked units, ExecStart= naming this venv's keyagent, and
    installs nothing."""
    status, out, err = run_ctl("service", "install", "--print")
    assert (status, err) == (0, "")
    keyagent = Path(sys.executable).parent / "keyagent"
    unit_dir = config_home / "systemd" / "user"
    headers = re.findall(r"(?m)^# (/.*/keyagent\.\w+)$", out)
    assert headers == [str(unit_dir / "keyagent.socket"), str(unit_dir / "keyagent.service")]
    assert re.findall(r"(?m)^ExecStart=.*$", out) == [f"ExecStart={keyagent} -D"]
    assert out.count(service.MARK) == 2
    assert not config_home.exists()


def test_rendered_units_differ_from_the_template_only_in_mark_and_command() -> None:
    """Outside /tmp, rendering changes the template's ExecStart= and adds the mark, nothing else."""
    units = service.render(Path("/opt/keyagent/bin/keyagent"))
    socket_text, service_text = units["keyagent.socket"], units["keyagent.service"]
    assert socket_text.split("\n", 1)[1] == SOCKET_UNIT.read_text()
    assert service_text.split("\n", 1)[1] == SERVICE_UNIT.read_text().replace(
        service.TEMPLATE_EXEC_START, "ExecStart=/opt/keyagent/bin/keyagent -D\n"
    )
    assert service.ownership(socket_text) == service.ownership(service_text) == "ours"


def test_an_installation_under_tmp_is_bound_in(tmp_path: Path) -> None:
    """What PrivateTmp= hides is bound in read-only: outermost directories only, never /tmp."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib" / "site").mkdir(parents=True)
    script = venv / "bin" / "keyagent"
    script.write_text("#!/bin/sh\n")
    assert service.hidden_by_private_tmp([script]) == [venv / "bin"]  # a file: its directory
    hidden = service.hidden_by_private_tmp(
        [script, venv / "lib" / "site", venv, Path("/tmp"), Path("/usr/bin"), Path("/nowhere")]
    )
    assert hidden == [venv]  # the prefix holds the rest
    service_text = service.render(script, hidden)["keyagent.service"]
    assert "PrivateTmp=yes\n# This installation lives under /tmp" in service_text
    assert re.findall(r"(?m)^BindReadOnlyPaths=.*$", service_text) == [f"BindReadOnlyPaths={venv}"]


def test_this_installation_needs_its_interpreter_and_package() -> None:
    """The paths to bind include the script, the interpreter its #! names, and the package."""
    keyagent = service.find_keyagent()
    needed = service.installation_paths(keyagent)
    assert keyagent in needed
    assert Path(sys.executable) in needed
    assert (ROOT / "keyagent").resolve() in {path.resolve() for path in needed}


def test_paths_a_unit_cannot_hold_unquoted_are_refused() -> None:
    """A space in the path is a ServiceError naming the way out; a % is doubled, not expanded."""
    with pytest.raises(service.ServiceError, match="install keyagent in a directory"):
        service.render(Path("/opt/my tools/bin/keyagent"))
    with pytest.raises(service.ServiceError, match="not an absolute path"):
        service.render(Path("bin/keyagent"))
    units = service.render(Path("/opt/100%/bin/keyagent"))
    assert "ExecStart=/opt/100%%/bin/keyagent -D\n" in units["keyagent.service"]


def test_the_mark_tells_ours_from_edited_from_foreign() -> None:
    """A marked unit is ours until one byte changes; a unit without the mark is foreign."""
    text = service.mark("[Unit]\nDescription=x\n")
    assert service.ownership(text) == "ours"
    assert service.ownership(text.replace("=x", "=y")) == "edited"
    assert service.ownership("[Unit]\nDescription=x\n") == "foreign"
    assert service.ownership(text.split("\n", 1)[1]) == "foreign"


@needs_analyze
def test_written_units_verify_and_keep_their_hardening(tmp_path: Path) -> None:
    """The service install writes (binds included) verifies cleanly and rates at most 2.0."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "keyagent"
    script.symlink_to(service.find_keyagent())
    units_dir = tmp_path / "units"
    units_dir.mkdir()
    for name, text in service.render(script, [venv]).items():
        (units_dir / name).write_text(text)
    home, runtime = tmp_path / "home", tmp_path / "run"
    unit_paths = [str(units_dir / name) for name in service.UNITS]
    verified = analyze(home, runtime, "verify", *unit_paths)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    rated = analyze(home, runtime, "security", "--offline=true", unit_paths[1])
    found = re.search(r"Overall exposure level for keyagent\.service: (\d+\.\d)", rated.stdout)
    assert found, rated.stdout + rated.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, rated.stdout


# --- refusals and failures, before or without a user manager -------------------------------


def test_install_refuses_a_unit_it_did_not_write(config_home: Path) -> None:
    """A keyagent.service of someone else's stops install before anything is written."""
    unit_dir = config_home / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / "keyagent.service").write_text("[Service]\nExecStart=/usr/bin/mine\n")
    status, out, err = run_ctl("service", "install")
    assert status == 1
    assert "was not written by keyagent-ctl service install" in err
    assert "service install --force" in err
    assert (unit_dir / "keyagent.service").read_text() == "[Service]\nExecStart=/usr/bin/mine\n"
    assert not (unit_dir / "keyagent.socket").exists()
    assert out == ""


def test_install_refuses_a_unit_edited_since_it_wrote_it(config_home: Path) -> None:
    """A unit install wrote and someone then edited is theirs now: install leaves it."""
    unit_dir = config_home / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    edited = service.render_for_this_installation()["keyagent.socket"] + "# mine\n"
    (unit_dir / "keyagent.socket").write_text(edited)
    status, _, err = run_ctl("service", "install")
    assert status == 1
    assert "was edited since keyagent-ctl service install wrote it" in err
    assert (unit_dir / "keyagent.socket").read_text() == edited


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_install_without_a_user_manager_writes_nothing_and_names_the_next_step(
    config_home: Path,
) -> None:
    """With no user manager to reach, install writes no unit (one no manager loads would
    only mislead, and leave files behind), says why and what to do."""
    status, out, err = run_ctl("service", "install")
    assert status == 1
    assert "no systemd user manager answers here" in err
    assert "nothing was written" in err
    assert "in your own login session" in err
    assert out == ""
    assert not (config_home / "systemd" / "user").exists()


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_uninstall_without_a_user_manager_removes_its_own_files(config_home: Path) -> None:
    """Units install wrote (and the link enable made), found where no user manager answers:
    uninstall removes them all the same, says so, and names the reload to run elsewhere."""
    unit_dir = config_home / "systemd" / "user"
    (unit_dir / "sockets.target.wants").mkdir(parents=True)
    for name, text in service.render_for_this_installation().items():
        (unit_dir / name).write_text(text)
    (unit_dir / "sockets.target.wants" / "keyagent.socket").symlink_to(unit_dir / "keyagent.socket")
    status, out, err = run_ctl("service", "uninstall")
    assert status == 0, err
    assert "no systemd user manager answers here" in out
    assert "systemctl --user stop keyagent.socket keyagent.service" in out
    assert list(unit_dir.iterdir()) == []


def test_uninstall_leaves_units_it_did_not_write(config_home: Path) -> None:
    """uninstall removes nothing it did not write, says so, and exits 1."""
    unit_dir = config_home / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    (unit_dir / "keyagent.socket").write_text("[Socket]\nListenStream=/x\n")
    status, _, err = run_ctl("service", "uninstall", "--force")
    assert status == 1
    assert "remove it yourself" in err
    assert (unit_dir / "keyagent.socket").exists()


def test_uninstall_with_nothing_installed_does_nothing(config_home: Path) -> None:
    """uninstall with no units installed says so and succeeds (it is idempotent)."""
    status, out, err = run_ctl("service", "uninstall")
    assert (status, err) == (0, "")
    assert "not installed" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["service", "status", "--print"], "--print goes with install"),
        (["service", "uninstall", "--print"], "--print goes with install"),
        (["service", "status", "--force"], "--force goes with install or uninstall"),
    ],
)
def test_options_that_mean_nothing_are_usage_errors(
    config_home: Path, argv: list[str], message: str
) -> None:
    """--print outside install and --force with status are usage errors (exit 64)."""
    status, _, err = run_ctl(*argv)
    assert status == 64
    assert message in err


def test_status_without_units_says_not_installed(config_home: Path) -> None:
    """status names the unit directory and says each unit is not installed; it exits 3
    (as systemctl is-active does for a unit not running): no agent would start."""
    status, out, _ = run_ctl("service", "status")
    assert status == 3
    assert f"unit directory: {config_home / 'systemd' / 'user'}\n" in out
    assert re.search(r"(?m)^keyagent\.socket: not installed, ", out), out
    assert re.search(r"(?m)^keyagent\.service: not installed, ", out), out


# --- a virtualenv under /tmp, a real user manager ------------------------------------------


@pytest.fixture
def tmp_venv(tmp_path: Path) -> Path:
    """A virtualenv under /tmp holding keyagent as pip would install it: the package (with
    its units, no contrib/) in site-packages, ``keyagent`` and ``keyagent-ctl`` in bin/.

    Its dependencies come from this Python's site-packages through a .pth file (the test
    must not download them).
    """
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    )
    shutil.copytree(
        ROOT / "keyagent", site / "keyagent", ignore=shutil.ignore_patterns("__pycache__")
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    scripts = {
        "keyagent": "import sys\nfrom keyagent.daemon import main\nsys.exit(main())\n",
        "keyagent-ctl": (ROOT / "contrib" / "bin" / "keyagent-ctl").read_text().split("\n", 1)[1],
    }
    for name, body in scripts.items():
        script = venv / "bin" / name
        script.write_text(f"#!{python}\n{body}")
        script.chmod(0o755)
    return venv


@needs_user_manager
@needs_root
def test_install_from_a_venv_starts_at_first_use_and_uninstall_leaves_nothing(
    user_manager: UserManager, tmp_venv: Path
) -> None:
    """From a venv under /tmp: install enables the socket, the first status starts the agent
    from that venv, install again changes nothing, uninstall leaves no trace."""
    run = user_manager(
        """
        ctl=$VENV/bin/keyagent-ctl
        find "$HOME" -mindepth 1 | sort >"$OUT/before"
        "$ctl" service install >"$OUT/install.txt"
        echo "enabled=$(systemctl --user is-enabled keyagent.socket)"
        echo "socket=$(systemctl --user is-active keyagent.socket)"
        echo "service_before=$(systemctl --user is-active keyagent.service || true)"
        timeout 20 "$ctl" status --json >"$OUT/status.json"
        timeout 10 systemctl --user start keyagent.service  # returns once READY=1 arrived
        pid=$(systemctl --user show -p MainPID --value keyagent.service)
        echo "main_pid=$pid"
        echo "cmdline=$(tr '\\0' ' ' <"/proc/$pid/cmdline")"
        "$ctl" service status >"$OUT/status.txt"; echo "status_exit=$?"
        "$ctl" service install >"$OUT/again.txt"
        units=$HOME/.config/systemd/user
        mv "$units/keyagent.service" "$OUT/keyagent.service"  # the socket alone starts nothing
        rc=0; "$ctl" service status >/dev/null || rc=$?; echo "status_exit_no_service=$rc"
        mv "$OUT/keyagent.service" "$units/keyagent.service"
        "$ctl" service uninstall >"$OUT/uninstall.txt"
        rc=0; "$ctl" service status >/dev/null || rc=$?; echo "status_exit_after=$rc"
        echo "socket_after=$(systemctl --user is-active keyagent.socket || true)"
        echo "service_after=$(systemctl --user is-active keyagent.service || true)"
        echo "unit_files=$(systemctl --user list-unit-files --no-legend 'keyagent*' | wc -l)"
        sock=$XDG_RUNTIME_DIR/keyagent/agent.sock
        echo "sock_after=$(test -e "$sock" && echo here || echo gone)"
        find "$HOME" -mindepth 1 | sort >"$OUT/after"
        """,
        {},
        env={"VENV": str(tmp_venv)},
        timeout=90,
    )
    assert run.returncode == 0, run.output
    keyagent = tmp_venv / "bin" / "keyagent"
    unit_dir = run.home / ".config" / "systemd" / "user"
    results = dict(run.results)
    first = run.json(run.out / "status.json")
    assert results.pop("main_pid") == str(first["pid"]), run.output
    # keyagent re-executes itself as its lean serving process: the venv's Python and package.
    cmdline = results.pop("cmdline")
    assert cmdline.startswith(f"{tmp_venv}/bin/python "), run.output
    assert f" {tmp_venv}/lib/" in cmdline, run.output
    assert results == {
        "enabled": "enabled",
        "socket": "active",
        "service_before": "inactive",  # nothing ran until the first client connected
        "status_exit": "0",  # the socket installed, enabled and active
        "status_exit_no_service": "3",
        "status_exit_after": "3",
        "socket_after": "inactive",
        "service_after": "inactive",
        "unit_files": "0",
        "sock_after": "gone",
    }, run.output

    installed = (run.out / "install.txt").read_text()
    assert f"wrote {unit_dir / 'keyagent.socket'}\n" in installed
    assert f"wrote {unit_dir / 'keyagent.service'}\n" in installed
    assert f"  ExecStart={keyagent} -D\n" in installed
    assert f"  BindReadOnlyPaths={tmp_venv}  (hidden by PrivateTmp= otherwise)\n" in installed
    assert "ran systemctl --user enable --now keyagent.socket\n" in installed

    status = (run.out / "status.txt").read_text()
    assert "keyagent.socket: installed by keyagent-ctl service install, enabled, active\n" in status
    assert "keyagent.service: installed by keyagent-ctl service install, active\n" in status
    assert f"runs: {keyagent} -D (this installation)\n" in status

    again = (run.out / "again.txt").read_text()
    assert again.count("unchanged ") == 2, again
    assert "wrote " not in again, again

    removed = (run.out / "uninstall.txt").read_text()
    assert "ran systemctl --user disable --now keyagent.socket keyagent.service\n" in removed
    # The agent's first start reaches the Secret Service, which D-Bus starts outside the
    # sandbox and which makes its store in ~/.local/share/keyrings: the user's data, not ours.
    after = [
        line
        for line in (run.out / "after").read_text().splitlines()
        if not line.startswith(f"{run.home}/.local")
    ]
    assert after == (run.out / "before").read_text().splitlines(), removed


@needs_user_manager
@needs_root
def test_install_force_replaces_a_foreign_unit_and_uninstall_force_removes_an_edited_one(
    user_manager: UserManager,
) -> None:
    """--force lets install replace a foreign unit, and uninstall remove a unit edited since."""
    run = user_manager(
        """
        echo "plain=$("$PYTHON" -m keyagent service install >/dev/null 2>&1; echo $?)"
        echo "forced=$("$PYTHON" -m keyagent service install --force >/dev/null; echo $?)"
        echo "socket=$(systemctl --user is-active keyagent.socket)"
        echo "# my note" >>"$HOME/.config/systemd/user/keyagent.service"
        echo "plain_uninstall=$("$PYTHON" -m keyagent service uninstall >"$OUT/u1.txt"; echo $?)"
        echo "service_file=$(test -e "$HOME/.config/systemd/user/keyagent.service" && echo kept)"
        "$PYTHON" -m keyagent service uninstall --force >"$OUT/u2.txt"
        echo "files=$(ls -A "$HOME/.config/systemd/user" | wc -l)"
        echo "socket_after=$(systemctl --user is-active keyagent.socket || true)"
        """,
        {"keyagent.service": "[Service]\nExecStart=/bin/true\n"},
    )
    assert run.returncode == 0, run.output
    assert run.results == {
        "plain": "1",
        "forced": "0",
        "socket": "active",
        "plain_uninstall": "0",  # the socket unit was still ours: that part was undone
        "service_file": "kept",
        "files": "0",
        "socket_after": "inactive",
    }, run.output
    assert "kept " in (run.out / "u1.txt").read_text()
    assert "removed " in (run.out / "u2.txt").read_text()
