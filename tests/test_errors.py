"""errors.is_out_of_memory: the one place an exception is recognised as running out of memory."""

import pytest
import torch

from ropelens import cli
from ropelens.errors import RopelensError, is_out_of_memory

HUGE = 2**60  # bytes: beyond any address space, so the allocator refuses at once


def cpu_allocator_error() -> RuntimeError:
    with pytest.raises(RuntimeError) as raised:
        torch.empty(HUGE, dtype=torch.uint8)
    return raised.value


def test_the_cpu_allocator_failure_is_out_of_memory():
    e = cpu_allocator_error()  # raised by torch itself, not a hand-written message
    assert "out of memory" not in str(e).lower()  # why the message list has a second entry
    assert is_out_of_memory(e)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        torch.cuda.OutOfMemoryError("HIP out of memory"),
        torch.OutOfMemoryError("no message of the usual kind"),  # by its class alone
        MemoryError(),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GiB)"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
        ValueError("out of memory"),  # not an allocator's error type
        KeyError("out of memory"),
        RopelensError("ppl.max_documents: must be >= 1"),
    ],
)
def test_not_out_of_memory(error):
    assert not is_out_of_memory(error)


def test_cli_exit_status_3_and_one_line_for_a_real_oom(monkeypatch, tmp_path, capsys):
    def allocate(args):
        torch.empty(HUGE, dtype=torch.uint8)

    monkeypatch.setattr(cli, "cmd_make_tiny", allocate)
    out = tmp_path / "m"
    assert cli.main(["make-tiny", "--out", str(out), "--pretrained-length", "8"]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ropelens: error: out of memory for {out}: ")
    assert lines[0].endswith("give the job more memory or a shorter length")
