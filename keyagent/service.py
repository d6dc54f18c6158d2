"""``keyagent-ctl service``: keyagent's systemd user units, installed for this installation.

The units ship in the package (``keyagent/units/``, the same files as ``contrib/systemd/``).
:func:`render` fills in the template for the installation running this code: ``ExecStart=``
names its ``keyagent`` script by absolute path (a unit's command is looked up in systemd's
own PATH, never the user's shell's), and whatever of the installation lives under ``/tmp``
or ``/var/tmp`` (hidden by ``PrivateTmp=yes``) is bound in read-only.

:func:`install` writes both units to ``$XDG_CONFIG_HOME/systemd/user``, each marked on its
first line with a hash of the rest, then runs ``daemon-reload`` and ``enable --now
keyagent.socket``. The mark is how :func:`uninstall` and a later :func:`install` know a file
is theirs: a unit without it, or edited since, is never replaced or removed without
``--force``. Every step is written to ``out``; every failure is a :class:`ServiceError`
whose message names the next step. ``systemctl`` runs with ``--user``, as a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from keyagent import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Literal, TextIO

    Ownership = Literal["ours", "edited", "foreign"]

SOCKET_UNIT = "keyagent.socket"
SERVICE_UNIT = "keyagent.service"
UNITS = (SOCKET_UNIT, SERVICE_UNIT)
TEMPLATE_EXEC_START = "ExecStart=%h/.local/bin/keyagent -D\n"
"""The template's command line: the console script where pipx and ``pip --user`` put it."""
PRIVATE_TMP_LINE = "PrivateTmp=yes\n"
# Named, not used: the directories PrivateTmp= hides, which an installation may live in.
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108
MARK = "# written by keyagent-ctl service install"
_MARK_LINE = re.compile(re.escape(MARK) + r"\b[^\n]* sha256:([0-9a-f]{64})\n")
SYSTEMCTL_TIMEOUT = 60.0
"""Seconds one ``systemctl --user`` call may take (``enable --now`` waits for the socket)."""
_UNSAFE_IN_UNIT = re.compile(r"[\s\"'\\;]")
"""Characters a path in ``ExecStart=`` or ``BindReadOnlyPaths=`` would need quoted."""


class ServiceError(Exception):
    """The units cannot be rendered, installed, removed or inspected; says what to do next."""


# --- this installation -------------------------------------------------------------------


def find_keyagent() -> Path:
    """The ``keyagent`` console script of the installation running this code, absolute.

    A virtualenv (pipx makes one per application) has it next to ``sys.executable``; a
    ``pip install --user`` in the user scheme's scripts directory; a system-wide install in
    the default scheme's. Never a bare name: the user manager's PATH is not the shell's.
    """
    beside = Path(sys.executable).parent / "keyagent"
    candidates: list[Path] = []
    if sys.prefix != sys.base_prefix:  # a virtualenv: its own scripts, nothing else
        candidates.append(beside)
    else:
        package = Path(__file__).resolve().parent
        user_scheme = f"{os.name}_user"
        user_site = sysconfig.get_path("purelib", user_scheme)
        if user_site and package.is_relative_to(Path(user_site).resolve()):
            candidates.append(Path(sysconfig.get_path("scripts", user_scheme)) / "keyagent")
        candidates += [Path(sysconfig.get_path("scripts")) / "keyagent", beside]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return Path(os.path.abspath(candidate))
    looked = ", ".join(str(candidate.parent) for candidate in dict.fromkeys(candidates))
    raise ServiceError(
        f"this installation's keyagent script is not in {looked}: reinstall keyagent with"
        " pipx, pip or pip --user (which install it), then run this command again"
    )


def _interpreter(script: Path) -> Path | None:
    """The interpreter a script's ``#!`` line names, if it is an absolute path."""
    try:
        with script.open("rb") as file:
            first = file.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    return Path(words[0]) if words and words[0].startswith("/") else None


def installation_paths(keyagent: Path) -> set[Path]:
    """What the daemon reads to start: the script, its interpreter (and the one that links
    to), the environment's prefixes, the keyagent package and every import directory."""
    import keyagent as package

    needed = {keyagent, Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix)}
    needed.add(Path(package.__file__ or ".").resolve().parent)
    interpreter = _interpreter(keyagent)
    if interpreter is not None:
        needed.add(interpreter)
    needed |= {Path(entry) for entry in sys.path if entry and os.path.isabs(entry)}
    return needed


def hidden_by_private_tmp(needed: Iterable[Path]) -> list[Path]:
    """The directories of ``needed`` that ``PrivateTmp=yes`` hides, outermost only.

    Each path counts as written and with its links resolved (a venv's python links to the
    base interpreter). /tmp and /var/tmp themselves are never listed: binding them in would
    undo PrivateTmp=yes.
    """
    candidates: set[Path] = set()
    for path in needed:
        for form in (Path(os.path.abspath(path)), path.resolve()):
            hidden = any(form.is_relative_to(tmp) for tmp in PRIVATE_TMP)
            if hidden and form not in PRIVATE_TMP and form.exists():
                candidates.add(form if form.is_dir() else form.parent)
    candidates -= set(PRIVATE_TMP)
    return sorted(
        path
        for path in candidates
        if not any(path != other and path.is_relative_to(other) for other in candidates)
    )


# --- rendering -----------------------------------------------------------------------------


def template(name: str) -> str:
    """A unit template as shipped in the package (``keyagent/units/NAME``)."""
    from importlib import resources

    return (resources.files("keyagent") / "units" / name).read_text(encoding="utf-8")


def _unit_path(path: Path, setting: str) -> str:
    """``path`` as a unit file setting takes it: ``%`` doubled (systemd expands specifiers)."""
    text = str(path)
    if _UNSAFE_IN_UNIT.search(text) or not text.isprintable():
        raise ServiceError(
            f"{setting}: the path {text!r} has a space, quote, backslash, semicolon or control"
            " character, which the unit would need quoted; install keyagent in a directory"
            " whose path has none, or write the units by hand from keyagent-ctl service"
            " install --print"
        )
    return text.replace("%", "%%")


def mark(body: str) -> str:
    """``body`` with the first line that says who wrote it and what it held."""
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{MARK}; keyagent-ctl service uninstall removes it. sha256:{digest}\n{body}"


def ownership(text: str) -> Ownership:
    """Whether a unit file is one :func:`install` wrote, unchanged ("ours"), one it wrote
    and someone edited since ("edited"), or someone else's ("foreign")."""
    found = _MARK_LINE.match(text)
    if found is None:
        return "foreign"
    body = text[found.end() :]
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return "ours" if digest == found.group(1) else "edited"


def render(keyagent: Path, binds: Iterable[Path] = ()) -> dict[str, str]:
    """Both units for ``keyagent`` (absolute), marked; ``binds`` are bound in read-only."""
    if not keyagent.is_absolute():
        raise ServiceError(f"ExecStart=: {keyagent} is not an absolute path")
    service = template(SERVICE_UNIT)
    if service.count(TEMPLATE_EXEC_START) != 1 or service.count(PRIVATE_TMP_LINE) != 1:
        raise ServiceError(
            "the keyagent.service template in this installation is damaged (no single"
            f" {TEMPLATE_EXEC_START.strip()} or {PRIVATE_TMP_LINE.strip()}): reinstall keyagent"
        )
    exec_start = f"ExecStart={_unit_path(keyagent, 'ExecStart=')} -D\n"
    service = service.replace(TEMPLATE_EXEC_START, exec_start)
    bind_lines = [f"BindReadOnlyPaths={_unit_path(p, 'BindReadOnlyPaths=')}\n" for p in binds]
    if bind_lines:
        why = (
            "# This installation lives under /tmp or /var/tmp, which PrivateTmp= hides from"
            " the\n# service: its directories are bound in, read-only.\n"
        )
        service = service.replace(PRIVATE_TMP_LINE, PRIVATE_TMP_LINE + why + "".join(bind_lines))
    return {SOCKET_UNIT: mark(template(SOCKET_UNIT)), SERVICE_UNIT: mark(service)}


def render_for_this_installation() -> dict[str, str]:
    """The units :func:`install` writes: for :func:`find_keyagent`, with what it needs bound."""
    keyagent = find_keyagent()
    return render(keyagent, hidden_by_private_tmp(installation_paths(keyagent)))


def unit_dir() -> Path:
    """The user manager's own unit directory: ``$XDG_CONFIG_HOME/systemd/user``."""
    return Path(paths.systemd_unit_dirs()[0])


def print_units(out: TextIO) -> None:
    """Write both units as install would, each after a ``# PATH`` line (as systemctl cat)."""
    directory = unit_dir()
    for number, (name, text) in enumerate(render_for_this_installation().items()):
        out.write(f"{'' if number == 0 else chr(10)}# {directory / name}\n{text}")


# --- systemctl -----------------------------------------------------------------------------


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``systemctl --user ARGS``; a failure (with ``check``) is a :class:`ServiceError`."""
    command = ["systemctl", "--user", *args]
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ServiceError(
            "systemctl is not installed, so there is no systemd user manager to start keyagent:"
            ' start it from your shell\'s start-up file instead (eval "$(keyagent)")'
        ) from None
    except subprocess.TimeoutExpired:
        raise ServiceError(
            f"{' '.join(command)} did not finish within {SYSTEMCTL_TIMEOUT:.0f}s: check the"
            " user manager (systemctl --user status), then run this command again"
        ) from None
    if check and result.returncode != 0:
        said = " ".join((result.stderr or result.stdout).split()) or f"status {result.returncode}"
        raise ServiceError(
            f"{' '.join(command)} failed: {said}; run this command in your own login session"
            " (where systemctl --user works), then again"
        )
    return result


def _unreachable_manager() -> str | None:
    """Why no systemd user manager answers ``systemctl --user`` here, or None if one does.
    ServiceError if systemctl itself is missing or hangs."""
    result = systemctl("show-environment", check=False)
    if result.returncode == 0:
        return None
    return " ".join((result.stderr or result.stdout).split()) or f"status {result.returncode}"


def _state(*args: str) -> str:
    """One word from ``systemctl --user is-enabled|is-active UNIT``, or why there is none."""
    try:
        result = systemctl(*args, check=False)
    except ServiceError as error:
        return f"unknown ({error})"
    return result.stdout.strip() or f"unknown ({' '.join(result.stderr.split())})"


# --- install, uninstall, status ------------------------------------------------------------


@dataclass(frozen=True)
class InstalledUnit:
    name: str
    path: Path
    text: str | None
    """The file's content; None if there is no such file."""

    @property
    def owner(self) -> Ownership | None:
        return None if self.text is None else ownership(self.text)


def _read_units(directory: Path) -> list[InstalledUnit]:
    found = []
    for name in UNITS:
        path = directory / name
        try:
            text: str | None = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as error:
            raise ServiceError(
                f"cannot read {path}: {error}; fix or remove it, then run this command again"
            ) from None
        found.append(InstalledUnit(name, path, text))
    return found


def _write(path: Path, text: str) -> None:
    """Replace ``path`` in one step: the manager never reads half a unit."""
    temporary = path.with_name(f".{path.name}.keyagent-ctl")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ServiceError(
            f"cannot write {path}: {os.strerror(error.errno or 0)}; make {path.parent} writable"
            " by you, then run this command again"
        ) from None


NOT_OURS = {
    "foreign": "was not written by keyagent-ctl service install",
    "edited": "was edited since keyagent-ctl service install wrote it",
}


def install(out: TextIO, *, force: bool = False) -> None:
    """Write both units for this installation, reload the manager, enable the socket."""
    units = render_for_this_installation()
    directory = unit_dir()
    installed = _read_units(directory)
    refused = [
        f"{unit.path} {NOT_OURS[unit.owner]}"
        for unit in installed
        if unit.text not in (None, units[unit.name]) and unit.owner != "ours" and unit.owner
    ]
    if refused and not force:
        raise ServiceError(
            "; ".join(refused) + ": nothing was changed; move it away, or run keyagent-ctl"
            " service install --force to replace it"
        )
    unreachable = _unreachable_manager()
    if unreachable is not None:  # units no manager loads would only mislead: write none
        raise ServiceError(
            f"no systemd user manager answers here ({unreachable}): nothing was written;"
            " run this command in your own login session, where systemctl --user works"
            " (keyagent-ctl service install --print shows the units)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServiceError(
            f"cannot create {directory}: {os.strerror(error.errno or 0)}; create it yourself,"
            " then run this command again"
        ) from None
    service_changed = False
    for unit in installed:
        text = units[unit.name]
        if unit.text == text:
            out.write(f"unchanged {unit.path}\n")
            continue
        _write(unit.path, text)
        verb = "wrote" if unit.text is None else "replaced"
        out.write(f"{verb} {unit.path}\n")
        service_changed |= unit.name == SERVICE_UNIT and unit.text is not None
    exec_start = next(line for line in units[SERVICE_UNIT].splitlines() if line.startswith("Exec"))
    out.write(f"  {exec_start}\n")
    for line in units[SERVICE_UNIT].splitlines():
        if line.startswith("BindReadOnlyPaths="):
            out.write(f"  {line}  (hidden by PrivateTmp= otherwise)\n")
    for args in (("daemon-reload",), ("enable", "--now", SOCKET_UNIT)):
        systemctl(*args)
        out.write(f"ran systemctl --user {' '.join(args)}\n")
    if service_changed and _state("is-active", SERVICE_UNIT) == "active":
        out.write(
            "the agent still runs the old command line until it restarts (which drops the keys"
            " it holds): systemctl --user restart keyagent.service\n"
        )
    out.write(
        "keyagent now starts at login, on the first connection to its socket: try"
        " keyagent-ctl status\n"
    )


def uninstall(out: TextIO, *, force: bool = False) -> None:
    """Stop and disable the units install wrote, remove their files, reload the manager.

    Files without the mark are never touched; ones edited since only with ``force``.
    """
    directory = unit_dir()
    installed = [unit for unit in _read_units(directory) if unit.text is not None]
    removable = [
        unit for unit in installed if unit.owner == "ours" or (force and unit.owner == "edited")
    ]
    kept = [unit for unit in installed if unit not in removable]
    if not installed:
        out.write(f"keyagent's units are not installed in {directory}: nothing to do\n")
        return
    if not removable:
        owners = "; ".join(f"{unit.path} {NOT_OURS[unit.owner or 'foreign']}" for unit in kept)
        hint = (
            "remove it yourself (systemctl --user disable --now, then delete the file)"
            if all(unit.owner == "foreign" for unit in kept)
            else "run keyagent-ctl service uninstall --force to remove it anyway"
        )
        raise ServiceError(f"{owners}: nothing was changed; {hint}")
    names = [unit.name for unit in removable]
    unreachable = _unreachable_manager()
    if unreachable is None:
        systemctl("disable", "--now", *names)
        out.write(f"ran systemctl --user disable --now {' '.join(names)}\n")
    else:
        # No manager runs them here (an install that never reached one, say): the files
        # and the link `enable` makes go all the same.
        out.write(f"no systemd user manager answers here ({unreachable}): removing the files\n")
        for name in names:
            link = directory / "sockets.target.wants" / name
            if link.is_symlink():
                try:
                    link.unlink()
                except OSError as error:
                    raise ServiceError(
                        f"cannot remove {link}: {os.strerror(error.errno or 0)}; remove it"
                        " yourself, then run this command again"
                    ) from None
                out.write(f"removed {link}\n")
    for unit in removable:
        try:
            unit.path.unlink(missing_ok=True)
        except OSError as error:
            raise ServiceError(
                f"cannot remove {unit.path}: {os.strerror(error.errno or 0)}; remove it"
                " yourself, then run systemctl --user daemon-reload"
            ) from None
        out.write(f"removed {unit.path}\n")
    if unreachable is None:
        systemctl("daemon-reload")
        out.write("ran systemctl --user daemon-reload\n")
    else:
        out.write(
            "if a user manager runs in your login session, keyagent may still run there: run"
            " systemctl --user stop keyagent.socket keyagent.service, then systemctl --user"
            " daemon-reload, there\n"
        )
    # `enable` made this directory for its link, and `disable` emptied it: it goes too.
    wants = directory / "sockets.target.wants"
    try:
        wants.rmdir()
    except OSError:
        pass  # not there, or holding another unit's link
    else:
        out.write(f"removed empty directory {wants}\n")
    for unit in kept:
        out.write(f"kept {unit.path}: it {NOT_OURS[unit.owner or 'foreign']}\n")


def _exec_start(text: str) -> str | None:
    found = re.search(r"(?m)^ExecStart=(.+)$", text)
    return found.group(1).strip() if found else None


def status(out: TextIO) -> bool:
    """Whether the units are installed (and by whom), enabled, active; what they run. True
    if both are installed and keyagent.socket is enabled and active: the first client then
    starts the agent."""
    directory = unit_dir()
    described = {
        None: "not installed",
        "ours": "installed by keyagent-ctl service install",
        "edited": "installed by keyagent-ctl service install, edited since",
        "foreign": "installed, not by keyagent-ctl service install",
    }
    out.write(f"unit directory: {directory}\n")
    socket_ready = service_installed = False
    for unit in _read_units(directory):
        states = [described[unit.owner]]
        if unit.name == SOCKET_UNIT:
            states.append(_state("is-enabled", SOCKET_UNIT))
        states.append(_state("is-active", unit.name))
        out.write(f"{unit.name}: {', '.join(states)}\n")
        if unit.name == SOCKET_UNIT:
            socket_ready = unit.owner is not None and states[1:] == ["enabled", "active"]
        if unit.name == SERVICE_UNIT and unit.text is not None:
            service_installed = True
            out.write(f"runs: {_describe_command(_exec_start(unit.text))}\n")
    return socket_ready and service_installed


def _describe_command(command: str | None) -> str:
    """An ExecStart= line, and whether its program is this installation's keyagent."""
    if command is None:
        return "(no ExecStart=)"
    program = Path(command.split()[0].replace("%%", "%"))
    try:
        this: Path | None = find_keyagent()
    except ServiceError:
        this = None
    if "%" in program.as_posix().replace("%%", ""):
        note = "a path with systemd specifiers"
    elif not (program.is_file() and os.access(program, os.X_OK)):
        note = "missing: run keyagent-ctl service install from the installation to run"
    elif this is not None and program == this:
        note = "this installation"
    else:
        note = "another installation" + (
            f"; keyagent-ctl service install here switches to {this}" if this else ""
        )
    return f"{command} ({note})"
