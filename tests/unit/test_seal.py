"""The end mark of dumps (watcher.dockerexec --seal): a stream cut between two frames is never whole."""

from __future__ import annotations

import random
import subprocess

import pytest

from watcher import commands
from watcher.dockerexec import SEAL_VARIABLE, SealedOutput, sealed_command

SEAL = b"0123456789abcdef0123456789abcdef"


def pass_through(stream: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    out = bytearray()
    sealer = SealedOutput(SEAL, out.extend)
    start = 0
    for cut in [*cuts, len(stream)]:
        sealer.feed(stream[start:cut])
        start = cut
    return bytes(out), sealer.sealed()


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_passes_the_output_on_and_keeps_back_the_seal(seed: int) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(rng.choice([0, 1, 31, 32, 33, 5000]))
    stream = payload + SEAL
    cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream), rng.randint(0, 12))))
    assert pass_through(stream, cuts) == (payload, True)


@pytest.mark.parametrize("stream", [
    b"PGDMP half a dump",  # cut short: no mark at all
    b"PGDMP" + SEAL + b" more output after it",  # the mark is only valid at the very end
    b"PGDMP" + SEAL[:-1],  # cut inside the mark
    b"",
])
def test_a_stream_without_the_seal_at_its_end_is_not_sealed(stream: bytes) -> None:
    _, sealed = pass_through(stream, [len(stream) // 2])
    assert not sealed


def test_sealed_command_in_a_real_shell() -> None:
    env = {SEAL_VARIABLE: SEAL.decode(), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(sealed_command(["printf", "%s", "dump with 'quotes' and $HOME"]), env=env,
                        capture_output=True, check=False)
    assert (ok.returncode, ok.stdout) == (0, b"dump with 'quotes' and $HOME" + SEAL)
    # A failing command: its own status and no mark, so a partial output stays unsealed.
    failed = subprocess.run(sealed_command(["sh", "-c", "printf partial; exit 3"]), env=env,
                            capture_output=True, check=False)
    assert (failed.returncode, failed.stdout) == (3, b"partial")


def test_exec_helper_seal_flag() -> None:
    argv = commands.exec_helper("abc", ("pg_dump",), seal=True)
    assert argv[argv.index("--container"):] == ("--container", "abc", "--seal", "--", "pg_dump")
