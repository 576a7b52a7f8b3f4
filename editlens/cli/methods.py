"""``editlens methods``: list the registered editing methods (built-in and plugins) and any that failed to load."""
from __future__ import annotations

import click


def list_methods() -> str:
    """One line per registered method (name, where it comes from, first docstring line), then import failures."""
    from editlens.edit.base import _discovery, get_method, method_import_errors, registered_methods

    names = registered_methods()
    sources = _discovery().sources
    lines = []
    for name in names:
        cls = get_method(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        origin = f"plugin {sources[name]}" if name in sources else cls.__module__
        lines.append(f"  {name:<12} {origin:<24} {doc[0] if doc else ''}")
    for err in method_import_errors():
        lines.append(f"  failed to import: {err}")
    return "\n".join(lines)


@click.command("methods")
def methods() -> None:
    """List the registered editing methods: built-in ones and those of installed plugins (entry-point group
    ``editlens.methods``); a method module that failed to import is shown with its error."""
    click.echo("Editing methods (editlens edit --method NAME; plugins: entry-point group editlens.methods):")
    click.echo(list_methods())
