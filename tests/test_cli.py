"""The `hiermem` command line as a user meets it: a reader that stops early, and help texts that list
every choice the code accepts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hiermem.cli import SIGPIPE_EXIT, build_parser

REPO = Path(__file__).resolve().parents[1]


def _closed_reader(*argv: str) -> subprocess.CompletedProcess:
    """Run a command whose stdout reader has gone away before it writes (`... | head` at its most abrupt)."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, *argv], stdout=write, stderr=subprocess.PIPE, cwd=REPO)
    os.close(write)
    os.close(read)  # the reader leaves without reading anything
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, err.decode())


@pytest.mark.parametrize("argv", [("-m", "hiermem.cli", "--help"), ("-m", "hiermem.cli", "notebooks", "list"),
                                  ("-m", "analysis.scaling", "forms")])
def test_a_reader_that_closes_early_ends_the_command_quietly(argv):
    result = _closed_reader(*argv)
    assert result.stderr == "" and result.returncode in (0, SIGPIPE_EXIT)  # argparse itself drops --help's EPIPE


def test_piping_into_head_prints_one_line_and_no_traceback():
    cmd = f"set -o pipefail; '{sys.executable}' -m hiermem.cli notebooks list | head -1"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1
    assert result.returncode in (0, SIGPIPE_EXIT)  # 141 only if head left before the last write


def _help(*argv: str) -> str:
    parser = build_parser(argv[0])
    for action in parser._subparsers._group_actions:  # walk down to the (sub)command's own parser
        parser = action.choices[argv[0]]
    for word in argv[1:]:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
    return " ".join(parser.format_help().split())


def test_help_texts_list_every_accepted_choice():
    assert "drop-level<l>" in _help("eval")
    for mode in ("none", "generic", "fetched", "blocked-drop", "blocked-reroute", "wrong-path", "oracle-path"):
        assert mode in _help("eval")
    for argv in (("data", "build"), ("data", "stats"), ("demo",)):
        text = _help(*argv)
        assert all(name in text for name in ("fast", "minilm", "tfidf")), argv
    assert "{smoke,small,full}" in _help("data", "build") and "{smoke,small}" in _help("data", "build")
    assert "{smoke,small}" in _help("demo") and "{smoke,small,study}" in _help("notebooks", "run")
    assert "--fail-fast" in _help("notebooks", "run") and "--keep-going" not in _help("notebooks", "run")


def test_help_texts_carry_no_internal_notes_or_placeholders():
    top = " ".join(build_parser().format_help().split())
    assert "register(subparsers)" not in top and "this file" not in top
    texts = [top] + [_help(*argv) for argv in (("count",), ("data", "build"), ("data", "stats"), ("eval",),
                                               ("demo",), ("notebooks",), ("notebooks", "run"), ("sweep", "run"))]
    for text in texts:
        for note in ("TODO", "FIXME", "XXX", "SMOKE_TIME", "run_all(", "scale=\"small\""):
            assert note not in text, (note, text[:200])
