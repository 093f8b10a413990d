"""Held-out evaluation through the pipeline under PP x EP equals one process's (fp32, 1e-5 relative)."""

import json

import pytest

# PP 2 x EP 2 under 1F1B, DualPipe (a rank holds two stages, mirror copies) and DualPipeV; PP 1 x EP 4.
LAYOUTS = ["2,2,1f1b,4", "2,2,dualpipe,4", "2,2,dualpipev,4", "1,4,1f1b,2"]


@pytest.mark.dist
def test_checkpoint_held_out_metrics_match_one_process(mpirun):
    rc, out, err = mpirun(4, "heldout_parity.py", *LAYOUTS, timeout=300)
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["layout"].split(",")[1].strip() for r in rows] == ["1f1b", "dualpipe", "dualpipev", "1f1b"]
    for row in rows:
        got, ref = row["result"], row["reference"]
        assert row["same_on_all_ranks"], row
        assert got["tokens"] == ref["tokens"] == 2 * 8 * 16
        for key in ("loss", "acc", "max_vio"):
            assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, row)
        for key in ("mtp_loss", "mtp_acc"):
            assert len(got[key]) == 1 and abs(got[key][0] - ref[key][0]) <= 1e-5 * abs(ref[key][0]), (key, row)
        assert ref["max_vio"] > 0 and 0 < ref["acc"] < 1
