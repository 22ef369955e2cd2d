"""training.allocator: freed tensor memory stays in the process once `keep_freed_memory` ran."""

import subprocess
import sys

import pytest

from training import allocator

PROBE = """
import sys, torch
from training.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
page = 4096
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(20 << 20)  # 80 MiB: glibc mmaps such a block by default (and unmaps it when freed)
before = rss()
del x
print((before - rss()) >> 20)  # MiB handed back to the OS by the free
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_keeps_a_freed_activation_for_reuse():
    def freed_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": "."})
        return int(out.stdout.strip())

    assert freed_mib("default") >= 15  # glibc's defaults: the block goes back to the OS (page faults next time)
    assert freed_mib("tuned") == 0  # kept in the heap, reused by the next step's allocation


def test_off_linux_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_allocator_benchmark_runs_end_to_end(capsys):
    from benchmarks import allocator as bench

    bench.main(["--models", "resnet20", "--pairs", "1", "--steps", "1", "--batch", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| `resnet20` |" in out and "keep_freed_memory img/s" in out
