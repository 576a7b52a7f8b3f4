"""``--quiet/-q`` for the commands that show progress (``edit``, ``eval``, ``trace``, ``bench``): silences every
progress bar and progress line of the command (:mod:`editlens.progress` mode ``off``) for its duration; results are
still printed. Without it, progress goes to stderr: a tqdm bar on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

from typing import Any, Callable

import click

QUIET_HELP = ("No progress bars or progress lines (results are still printed). Without it, progress goes to stderr: "
              "a bar with the time left on a terminal, one plain line every 30 s otherwise "
              "(EDITLENS_PROGRESS_INTERVAL).")


def quiet_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--quiet/-q`` flag (parameter ``quiet``)."""
    return click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)(f)


def apply_quiet(quiet: bool) -> None:
    """Silence progress until the current click command ends (restored when its context closes)."""
    if not quiet:
        return
    from editlens.progress import configure, restore

    prev = configure(quiet=True)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: restore(prev))
