"""The helpers' reading of their arguments (issue 20): argparse's answer, without argparse for watcher.commands' argv.

`python -m watcher.dockerexec` and `python -m watcher.keydump` read the argv watcher.commands writes by hand
(dockerexec.plain_options) and leave anything else to argparse; either way the answer, the usage message and the
exit status are argparse's.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import pytest

from watcher import commands, dockerexec, keydump

PG_DUMP = commands.pg_dump_command(60.0)[1:]

# Each helper's argv as watcher.commands writes them, and the same with the hand-off's --handoff-fd.
WRITTEN = [
    commands.exec_helper("c0ffee", ("pg_dump", *PG_DUMP), env_names=["PGPASSWORD"],
                         env_values={"PGUSER": "app", "PGDATABASE": "shop"}, seal=True, stall_timeout_s=600),
    commands.exec_helper("c0ffee", ("pg_restore", "--list"), stdin=True),
    commands.exec_helper("c0ffee", ("true",)),
    commands.key_ordered_dump("c0ffee", ("pg_dump", *PG_DUMP), env_names=["PGPASSWORD"],
                              env_values={"PGUSER": "app"}, lock_wait_s=2.5, stall_timeout_s=90),
    commands.key_ordered_dump("c0ffee", ("pg_dump",), lock_wait_s=60),
]
WRITTEN += [(*argv[:argv.index("--")], "--handoff-fd", "7", *argv[argv.index("--"):]) for argv in list(WRITTEN)]

# Everything else: abbreviations, --name=value, values that look like options, help, errors.
ODD_EXEC = [
    ["--container", "abc", "pg_dump"],
    ["--container", "abc", "--", "--", "x"],
    ["--container", "abc", "--"],
    ["--container", "abc"],
    ["--cont", "abc", "--", "true"],
    ["--container=abc", "--env=X", "--", "true"],
    ["--container", "", "--", "true"],
    ["--container", "-x y", "--", "true"],
    ["--container", "--", "true"],
    ["--container", "a", "--container", "b", "--", "-x"],
    ["--container", "a", "--stall-timeout", "-5", "--", "true"],
    ["--container", "a", "--stall-timeout", "soon", "--", "true"],
    ["--container", "a", "--stall-timeout", " 1e3 ", "--handoff-fd", "0x7", "--", "true"],
    ["--container", "a", "--stdin=1", "--", "true"],
    ["--env", "A", "--", "true"],
    ["--container", "a", "--unknown", "--", "true"],
    ["-h"],
    [],
]
ODD_KEYDUMP = [
    ["--container", "a", "--", "pg_dump"],
    ["--container", "a", "--lock-wait-ms", "2.5", "--", "pg_dump"],
    ["--container", "a", "--lock-wait-ms", "-1", "--", "pg_dump"],
    ["--container", "a", "--lock", "5", "--", "pg_dump"],
    ["--container", "a", "--lock-wait-ms", "5", "--stdin", "--", "pg_dump"],
    ["--container", "a", "--lock-wait-ms", "5", "pg_dump"],
    ["--help"],
]


def answer(parse: Callable[[list[str]], object], argv: Sequence[str]) -> tuple[object, ...]:
    """What `parse` does with `argv`: ("args", its result), or ("exit", status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return ("args", parse(list(argv)))
    except SystemExit as exc:
        return ("exit", exc.code, out.getvalue(), err.getvalue())


def helper_of(argv: Sequence[str]) -> tuple[ModuleType, list[str]]:
    """The helper module an argv of watcher.commands runs, and its arguments."""
    return (keydump if argv[2] == "watcher.keydump" else dockerexec), list(argv[3:])


@pytest.mark.parametrize("written", WRITTEN, ids=lambda argv: " ".join(argv[2:6]))
def test_written_argv_read_by_hand_as_argparse_reads_it(written: Sequence[str]) -> None:
    module, argv = helper_of(written)
    assert answer(module._parse_args, argv) == answer(module._parsed_by_argparse, argv)


@pytest.mark.parametrize(("module", "argv"), [(dockerexec, argv) for argv in ODD_EXEC]
                         + [(keydump, argv) for argv in ODD_KEYDUMP])
def test_other_argv_answered_as_argparse_answers_it(module: ModuleType, argv: list[str]) -> None:
    assert answer(module._parse_args, argv) == answer(module._parsed_by_argparse, argv)


def test_written_argv_needs_no_argparse() -> None:
    script = ("import json, sys\nfrom watcher import dockerexec, keydump\n"
              "for module, argv in json.loads(sys.argv[1]):\n"
              "    (keydump if module == 'watcher.keydump' else dockerexec)._parse_args(argv)\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    written = json.dumps([(argv[2], list(argv[3:])) for argv in WRITTEN])
    done = subprocess.run([sys.executable, "-c", script, written], capture_output=True, text=True, timeout=60,
                          check=True)
    loaded = set(json.loads(done.stdout))
    assert sorted(name for name in ("argparse", "gettext", "dataclasses", "inspect") if name in loaded) == []
