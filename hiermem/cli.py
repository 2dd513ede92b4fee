"""`hiermem` command line.

Each command lives beside the code it drives and exposes `register(subparsers)`; this file only
collects them. Only the module of the command being run is imported, so `hiermem count` needs
torch alone (no datasets, faiss or pandas); `hiermem --help` imports them all to list every command.

    hiermem count   --anchor openlm-160m --memory 256,64,16,0 [--json]   how big is this?
    hiermem data    build | stats                                          corpus, probes, routing
    hiermem train   CONFIG.yaml                                            one run directory
    hiermem eval    RUN_DIR                                                tidy evaluation tables
    hiermem sweep   plan | run | results SPEC.yaml                         resumable sweeps, tidy tables
    hiermem demo                                                           the main end-to-end job
    hiermem notebooks run                                                  execute notebooks with papermill
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module that defines `register(subparsers)`; order is the order shown in --help
COMMANDS = {
    "count": "hiermem.accounting",
    "data": "hiermem.data.cli",
    "train": "hiermem.train",
    "eval": "hiermem.evaluate",
    "sweep": "hiermem.sweep_cli",
    "demo": "hiermem.demo",
    "notebooks": "hiermem.notebooks",
}
COMMAND_MODULES = tuple(COMMANDS.values())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with `command` alone when it is a known one."""
    parser = argparse.ArgumentParser(prog="hiermem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ((COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # command (or its package) not built yet
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError) as e:
        print(f"hiermem {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
