"""The data-parallel cost model (gpubp/scaling.py) against numbers worked by hand."""

from __future__ import annotations

import os

import pytest

from gpubp import scaling as S
from tests.conftest import ROOT


def test_ring_allreduce_time():
    # alpha + 2 (N-1)/N B / beta = 1e-5 + 1.75 * 1e9 / 1e11 = 0.01751 s
    link = S.Link("test", 8, 1e11, 1e-5)
    assert link.allreduce_s(1e9) == pytest.approx(0.01751, rel=1e-12)


def test_step_without_overlap_adds_the_whole_allreduce():
    # sizes [2, 3, 1]: 2*3+3 + 3*1+1 = 13 parameters, 52 bytes; N = 2: T = 52 / beta = 1 s
    link = S.Link("test", 2, 52.0, 0.0)
    assert S.n_params([2, 3, 1]) == 13
    assert S.step_time([2, 3, 1], 1, 10.0, link, overlap=False) == pytest.approx(11.0)
    assert S.efficiency([2, 3, 1], 1, 10.0, link, overlap=False) == pytest.approx(10 / 11)


def test_overlapped_step_by_hand():
    """sizes [2, 3, 1], batch 1, t_c = 10 s. FLOPs (2 per weight per GEMM): forward
    12 + 6, dW 12 + 6, dX 0 + 6: 42 in all. Layer 1's bucket (4 values, 16 bytes) is
    ready at (18 + 6)/42 * 10 = 5.714 s and takes 0.5 + 16/4 = 4.5 s; layer 0's (9
    values, 36 bytes) is ready at 10 s but waits for the stream until 10.214 s, then
    takes 0.5 + 36/4 = 9.5 s: the step ends at 240/42 + 14 = 19.714 s."""
    link = S.Link("test", 2, 4.0, 0.5)
    assert S.step_time([2, 3, 1], 1, 10.0, link) == pytest.approx(240 / 42 + 14, rel=1e-12)
    assert S.efficiency([2, 3, 1], 1, 10.0, link) == pytest.approx(10 / (240 / 42 + 14), rel=1e-12)


def test_batch_for_the_target():
    """One layer [1, 1]: its bucket is ready only when the backward pass ends, so the
    whole all-reduce (8 bytes, N = 2, beta = 8: 1 s) is exposed: 90% needs t_c >= 9 s.
    t_c = max(1 s, 6 * 1 weight * rows / rate) with rate = 6 * 64 FLOP/s: 576 rows."""
    link = S.Link("test", 2, 8.0, 0.0)
    assert S.batch_for([1, 1], 64, 1.0, link, rate=6.0 * 64) == 576
    assert S.batch_for([1, 1], 64, 100.0, link, rate=6.0 * 64) == 64  # already met
    assert S.batch_for([1, 1], 64, 1.0, S.Link("slow", 2, 1e-30, 0.0), rate=6.0 * 64) is None


def test_wide_on_nvlink():
    # 83,906,560 float32 gradients = 335,626,240 bytes: 15 us + 1.75 * 335626240 / 450e9 = 1.3202 ms
    row = {r["case"]: r for r in S.rows(S.MEASURED_H200)}["wide"]
    assert row["params"] == 83_906_560
    assert row[S.NVLINK_8.name]["allreduce_ms"] == pytest.approx(0.015 + 1.75 * 335_626_240 / 450e9 * 1e3)


def test_docs_show_the_model_s_table():
    """docs/scaling.md holds the table this module prints (float32 and tf32)."""
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        text = f.read()
    for precision in ("float32", "tf32"):
        assert S.markdown(S.rows(S.MEASURED_H200, precision), precision) in text
