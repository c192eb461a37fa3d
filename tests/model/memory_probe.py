"""Peak memory of scoring long sequences, measured in a process of its own (Linux).

``python -m tests.model.memory_probe FOLDER:N1,N2 [FOLDER:N1,...]`` loads each RM (CPU,
float32), scores a warm-up batch, then for each N a right-padded batch of two rows, N and
N - 10 tokens, and prints JSON ``{FOLDER: {N: bytes}}``: how far the process's resident memory
rose above where it was before that batch. The kernel's peak (``VmHWM``) is reset before each batch
(``/proc/self/clear_refs``), and malloc returns large blocks to the kernel when they are freed
(a fixed mmap threshold, trimmed before each batch), so each figure is what that batch alone
needed; a fresh process keeps other tests' allocations out of it.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch

from tokenreward_service.loading import load_reward_model

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def main(argv: list[str]) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)  # fixed: blocks of 64 KiB and more are mmapped
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)
    generator = torch.Generator().manual_seed(0)
    report: dict[str, dict[int, int]] = {}
    for run in argv:
        folder, _, lengths = run.rpartition(":")
        model = load_reward_model(folder, device="cpu", dtype="float32")
        model.score([torch.randint(3, 100, (600,), generator=generator).tolist()] * 2)
        needed = report.setdefault(folder, {})
        for n in map(int, lengths.split(",")):
            rows = [torch.randint(3, 100, (m,), generator=generator).tolist() for m in (n, n - 10)]
            libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
            before = _status("VmRSS")
            scores = model.score(rows)
            needed[n] = _status("VmHWM") - before
            assert [len(s) for s in scores] == [n, n - 10]
            assert all(bool(torch.isfinite(s).all()) for s in scores)
            del scores
        del model
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
