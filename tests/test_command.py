"""The publisher's one way of running build tools: what a user reads when one is missing or fails."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from seedboot.agent.errors import SeedError
from seedboot.tools import command


def test_output_environment_and_directory(tmp_path: Path) -> None:
    out = command.run(["sh", "-c", 'echo "$SEED_X $(pwd)"'], env={"SEED_X": "hello"}, cwd=tmp_path)
    assert out == f"hello {tmp_path}\n"
    assert command.run(["cat"], stdin="fed in\n") == "fed in\n"


def test_bytes_in_and_out() -> None:
    data = bytes(range(256)) * 64
    frame = command.run_bytes(["gzip", "-c"], data)
    assert zlib.decompress(frame, wbits=31) == data


def test_missing_program_says_so_with_the_hint() -> None:
    with pytest.raises(SeedError) as e:
        command.run(["seedboot-no-such-tool", "x"], hint="apt-get install it")
    assert str(e.value) == "seedboot-no-such-tool is not installed (apt-get install it)"


def test_failure_names_the_command_its_exit_and_last_words() -> None:
    script = "for i in 1 2 3 4 5; do echo line$i >&2; done; exit 3"
    with pytest.raises(SeedError) as e:
        command.run(["sh", "-c", script, "arg0", "more"])
    assert e.value.message == "sh -c " + script + " ... failed (exit 3): line3 / line4 / line5"
    assert e.value.hint == command.SETUP_HINT
