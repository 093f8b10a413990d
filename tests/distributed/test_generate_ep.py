"""Expert-parallel generation under mpirun (2 and 4 ranks) gives the tokens of one process."""

import json

import pytest
from _mpi import run_mpi


@pytest.mark.parametrize("n", [2, 4])
def test_expert_parallel_generation_matches_one_process(n):
    pytest.importorskip("mpi4py")
    rc, out, err = run_mpi(n, "ep_generate.py", timeout=300)
    assert rc == 0, f"{out[-2000:]}\n{err[-2000:]}"
    results = sorted((json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                      if line.startswith("EPRESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(n))
    for r in results:
        assert r["world"] == n and r["local_experts"] == [8 // n] * 3  # two main MoE layers and the MTP one
        assert r["equal"] == {"greedy": True, "mtp-greedy": True, "sampled": True}, r
