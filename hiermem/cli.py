"""`hiermem` command line (what `hiermem --help` shows is DESCRIPTION below).

Each command lives beside the code it drives and exposes `register(subparsers)`; this file only
collects them. Only the module of the command being run is imported, so `hiermem count` needs
torch alone (no datasets, faiss or pandas); `hiermem --help` imports them all to list every command.
A reader that stops early (`hiermem ... | head`) ends the command quietly (`quiet_broken_pipe`).
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "report": "hiermem.report",
    "forget": "hiermem.edit_eval",
    "learn": "hiermem.edit_eval",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))  # a module may register several commands

DESCRIPTION = """\
hiermem: pretraining language models with hierarchical parametric memories.

    hiermem count   --anchor openlm-160m --memory 256,64,16,0 [--json]   how big is this?
    hiermem data    build | stats                                          corpus, probes, routing
    hiermem train   CONFIG.yaml                                            one run directory
    hiermem eval    RUN_DIR                                                tidy evaluation tables
    hiermem sweep   plan | run | results SPEC.yaml                         resumable sweeps, tidy tables
    hiermem demo                                                           the main end-to-end job
    hiermem notebooks list | run | strip | check                           execute notebooks with papermill
    hiermem report  [--screenshot]                                         results/report/index.html (+ browser check)
    hiermem forget  RUN_DIR --nodes PATH... | --subjects FILE --out NEW    remove memory blocks (zeroed in the files)
    hiermem learn   RUN_DIR --docs DIR --out NEW                           train only the blocks new documents reach

Scales (README, "Scales"): smoke (minutes on a CPU), small (the CPU study; `make demo`), full (data only).
`hiermem COMMAND --help` describes a command.
"""
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with `command` alone when it is a known one."""
    parser = argparse.ArgumentParser(prog="hiermem", description=DESCRIPTION,
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


def quiet_broken_pipe(run, *args):
    """`run(*args)`, but a reader that stops early (`hiermem ... | head`) ends it quietly: no traceback,
    no 'Exception ignored' at exit, exit status 141. Output is flushed here, so the error is caught even
    when it surfaces only at the final flush (or after argparse's --help)."""
    try:
        try:
            return run(*args)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at /dev/null so that flush cannot fail
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file
            pass
        return SIGPIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    return quiet_broken_pipe(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except BrokenPipeError:
        raise
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError) as e:
        print(f"hiermem {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
