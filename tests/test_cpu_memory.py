"""pyllm.cpu_memory: a freed CPU tensor's pages are reused by the next tensor of its size instead of
faulting again; the CLI's computing commands turn it on first; PYLLM_REUSE_CPU_MEMORY=0 keeps the
default."""
import json
import os
import subprocess
import sys

import pytest

import pyllm.cli as cli
import pyllm.cpu_memory as cpu_memory

REUSE = """
import json, resource
from pyllm.cpu_memory import reuse_cpu_memory
done = reuse_cpu_memory()
import torch
faults = []
for _ in range(4):  # 8 MiB: above malloc's default 128 KiB mmap threshold, below 32 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(2 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(json.dumps({"done": done, "faults": faults}))
"""


def run() -> dict:
    env = {**os.environ, "PYLLM_REUSE_CPU_MEMORY": "1"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    out = subprocess.run([sys.executable, "-c", REUSE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc's malloc only")
def test_a_freed_tensors_pages_are_reused():
    on = run()
    assert on["done"]["malloc"] is True
    # the first 8 MiB tensor faults its pages in (2,048 of 4 KiB; fewer on huge pages), the next ones land
    # on them (glibc's default here: 2,094, 1,802, 2,048, 0)
    assert max(on["faults"][1:]) < 100


def test_the_clis_computing_commands_turn_it_on_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cpu_memory, "reuse_cpu_memory", lambda: calls.append(1) or {})
    assert cli.main(["generate", "--run", str(tmp_path / "none"), "--prompt", "x"]) == 2  # no run there
    assert calls == [1]
    assert cli.main(["info"]) == 0
    assert calls == [1]


@pytest.mark.parametrize("value", ["0", "false", "Off", "no"])
def test_off_by_environment(monkeypatch, value):
    monkeypatch.setenv("PYLLM_REUSE_CPU_MEMORY", value)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert cpu_memory.reuse_cpu_memory() == {"malloc": False, "huge_pages": False}
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
