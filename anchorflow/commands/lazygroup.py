"""LazyGroup: a click group whose sub-commands are imported only when used.

Shared by the root ``anchorflow`` group (:mod:`anchorflow.cli`) and ``anchorflow train``; it lives
under the commands so that no command module imports :mod:`anchorflow.cli` (no import cycle).
"""

from __future__ import annotations

import importlib

import click

from ..base.errors import AnchorflowError


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when they run (or show their help).

    ``commands`` maps a name to (module, attribute, one-line help); a module name without dots
    is taken relative to ``anchorflow.commands``.
    """

    commands_table: dict[str, tuple[str, str, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands_table)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands_table:
            return None
        module, attr, _ = self.commands_table[name]
        module = module if "." in module else f"anchorflow.commands.{module}"
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise AnchorflowError(f"'{name}' is not available in this installation ({module} is missing)") from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in self.commands_table.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
