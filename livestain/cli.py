"""``livestain``: one command in front of the daemon, the worker and the viewer.

Every group of commands registers itself the same way: a module's ``register`` adds
its subcommands to the parser, each with its handler as ``func``. Errors a user can
fix (a busy port, an existing dataset, a bad model file, no daemon running) are printed
as one line saying what to do, not as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from livestain import __version__

USER_ERRORS = (OSError, FileExistsError, TimeoutError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    from livestain import run_commands
    from livestain.devices import simulate_cli
    from livestain.inference import adapt, batch_cli, commands

    parser = argparse.ArgumentParser(
        prog="livestain",
        description="Live virtual staining: predict fluorescent structures from brightfield "
        "z-stacks as they are acquired.",
    )
    parser.add_argument("--version", action="version", version=f"livestain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run_commands, commands, batch_cli, adapt, simulate_cli):
        group.register(sub)
    # `train --sim-pretrain` renders with the simulator, which the inference package
    # does not import (a worker host may lack it): the application hands it over
    from livestain.simpretrain import simulated_like

    sub.choices["train"].set_defaults(simulate_like=simulated_like)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # pymmcore-plus logs every MDA event at INFO: thousands of lines an hour
    logging.getLogger("pymmcore-plus").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"livestain {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
