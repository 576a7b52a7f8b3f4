"""``editlens`` command-line entry point.

Subcommands live in their own modules under :mod:`editlens.cli` and are registered here (a missing module is a
packaging error and fails loudly). Command modules import heavy or optional dependencies inside the command, so
``--help`` is fast and a command whose optional extra is missing explains what to install when run.
"""
from __future__ import annotations

import importlib
import sys

import click

from editlens.errors import EditlensError

#: (module, attribute) of every subcommand, in help order
_COMMANDS = [
    ("editlens.cli.basic", "demo"),
    ("editlens.cli.basic", "models"),
    ("editlens.cli.methods", "methods"),
    ("editlens.cli.data", "data"),
    ("editlens.cli.edit", "edit_cmd"),
    ("editlens.cli.train", "train_cmd"),
    ("editlens.cli.eval", "eval_cmd"),
    ("editlens.cli.audit", "audit_cmd"),
    ("editlens.cli.stats", "stats"),
    ("editlens.cli.trace", "trace"),
    ("editlens.cli.bench", "bench"),
    ("editlens.cli.report", "report"),
    ("editlens.cli.compare", "compare_cmd"),
]

HELP = """editlens: edit the knowledge of causal language models and measure what an edit really did.

\b
Typical session:
  editlens models                         # built-in models and what is installed
  editlens methods                        # editing methods (built-in and plugins)
  editlens data inspect facts.json        # detect a dataset format, show one normalised case
  editlens demo                           # edit the embedded SmolLM2 and measure the edit (offline)
  editlens eval --model smollm2-135m --data facts.json --metrics gt,gtfree
  editlens train --method mend --synthetic 300 --out editors/mend   # train an editor (MEND, SERAC...)
  editlens audit --base smollm2-135m --model ./edited   # what changed in an edited checkpoint
  editlens stats --model smollm2-135m --layers 4,5,6,7,8
  editlens trace --data facts.json --limit 5 --kind mlp --out trace/   # where facts are recalled
  editlens bench examples/locality_sweep.toml   # run a spec into a resumable SQLite store
  editlens report results.sqlite --html report.html
  editlens compare results.sqlite --ref pre-edit  # paired differences, bootstrap CIs, Holm

Models: a built-in name (smollm2-135m, tiny-llama, ...), a .gguf file, a local checkpoint directory or a
Hugging Face hub id. Nothing is downloaded unless you pass a hub id and have network access.
"""


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # turn editlens errors into clean messages
        try:
            return super().invoke(ctx)
        except EditlensError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="editlens")
def cli() -> None:
    pass


def _register() -> None:
    for mod_name, attr in _COMMANDS:
        cli.add_command(getattr(importlib.import_module(mod_name), attr))


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="editlens")


if __name__ == "__main__":  # pragma: no cover
    main()
