"""Shell completion for ``keyagent-ctl`` and ``keyagent``, written by shtab from the parsers.

Nothing here is hand-written per shell: shtab walks the same ArgumentParser objects that
parse the command line, so a new option completes as soon as it exists. This module, and
shtab with it, is imported only by ``keyagent-ctl completion``: ``keyagent-ctl get`` never
pays for either.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

PATH_METAVARS = frozenset(("PATH", "FILE"))
"""Options whose value is a file name (--socket PATH, --config FILE, ...): complete files."""

MISSING_SHTAB = (
    "shell completion needs the shtab package, which this installation lacks; install it"
    " where keyagent is installed (for example: pip install shtab) and run the command again"
)


def parser_for(program: str) -> argparse.ArgumentParser:
    """The parser of ``program`` (``keyagent-ctl`` or ``keyagent``)."""
    if program == "keyagent":
        from keyagent.daemon import build_parser
    else:
        from keyagent.cli import build_parser
    return build_parser()


def completion_script(shell: str, program: str = "keyagent-ctl") -> str:
    """The completion script for ``program`` in ``shell`` (bash, zsh or fish).

    Raises :class:`keyagent.cli.UsageError` naming the install command if shtab is missing.
    """
    try:
        import shtab
    except ImportError:
        from keyagent.cli import UsageError

        raise UsageError(MISSING_SHTAB) from None
    parser = parser_for(program)
    _complete_paths(parser, shtab.FILE)
    script: str = shtab.complete(parser, shell=shell)
    return script if script.endswith("\n") else script + "\n"


def _complete_paths(parser: argparse.ArgumentParser, files: object) -> None:
    """Mark every option that takes a file name, in ``parser`` and its subcommands, so
    shtab completes it with file names (shtab reads an action's ``complete`` attribute)."""
    import argparse

    for action in parser._actions:
        if action.metavar in PATH_METAVARS:
            action.complete = files  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                _complete_paths(subparser, files)
