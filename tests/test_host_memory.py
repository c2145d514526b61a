"""Freed host memory is reused: a KV cache remade every step stops faulting in fresh pages.

Counted in page faults (deterministic for one allocator), not time: each run is a fresh process,
since the setting is process-wide.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GROWING_CACHE = """
import resource, sys, torch
from flora_core.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()

def steps(count):
    # 32 rows' keys, one column more each step by concatenation (DynamicCache), cut back now and then (rows leaving)
    cache = torch.zeros(32, 4, 0, 64)
    for _ in range(count):
        cache = torch.cat([cache, torch.ones(32, 4, 1, 64)], dim=2)
        if cache.shape[2] > 150:
            cache = cache[:, :, -20:].clone()

steps(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(200)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", GROWING_CACHE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings; other C libraries keep "
                    "or return memory their own way")
def test_a_cache_remade_every_step_reuses_freed_memory_instead_of_faulting_in_pages():
    default, kept = page_faults("default"), page_faults("keep")
    assert kept * 5 < default, f"{kept} page faults with freed memory kept, {default} without"
