"""`hiermem` command line.

Each command lives beside the code it drives and exposes `register(subparsers)`; this file only
collects them, so that `hiermem --help` stays fast (heavy imports happen inside the handlers).

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

# module paths that define `register(subparsers)`; order is the order shown in --help
COMMAND_MODULES = (
    "hiermem.accounting",
    "hiermem.data.cli",
    "hiermem.train",
    "hiermem.evaluate",
    "hiermem.sweep_cli",
    "hiermem.demo",
    "hiermem.notebooks",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiermem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
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
    parser = build_parser()
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
