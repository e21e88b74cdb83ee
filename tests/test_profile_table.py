"""tests/graph_kernel_profile.py's table from Nsight Systems' CSV reports (the GPU visit
makes them; here, reports written by hand in nsys's format, with known totals)."""

from __future__ import annotations

from .graph_kernel_profile import table

KERN_SUM = """Processing [report.sqlite] with [cuda_gpu_kern_sum.py]...

Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name
66.7,2000,2,1000.0,1000.0,1000,1000,0.0,sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize64x64x32
33.3,1000,2,500.0,500.0,500,500,0.0,"loss_rows_f32"
"""

# two steps of a GEMM and a loss each, gaps between them, and a copy after the steps that
# the span leaves out
TRACE = """Start (ns),Duration (ns),CorrId,GrdX,GrdY,GrdZ,BlkX,BlkY,BlkZ,Reg/Trd,StcSMem (MB),Name
100,1000,1,1,1,1,256,1,1,32,0.0,sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize64x64x32
1600,500,2,1,1,1,256,1,1,32,0.0,loss_rows_f32
3100,1000,3,1,1,1,256,1,1,32,0.0,sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize64x64x32
4300,500,4,1,1,1,256,1,1,32,0.0,"loss_rows_f32"
9000,800,5,,,,,,,,,[CUDA memcpy Device-to-Host]
"""


def test_the_table_divides_by_the_steps_and_finds_the_gaps(tmp_path):
    ks, tr = tmp_path / "k.csv", tmp_path / "t.csv"
    ks.write_text(KERN_SUM)
    tr.write_text(TRACE)
    text = table("tiny", 2, str(ks), str(tr))
    lines = text.splitlines()
    gemm = next(line for line in lines if "xmma" in line)
    loss = next(line for line in lines if "loss_rows" in line)
    assert "| 1.00 | 1.00 | 66.7 |" in gemm  # 2 launches, 2 us over 2 steps
    assert "| 1.00 | 0.50 | 33.3 |" in loss
    assert lines.index(gemm) < lines.index(loss)  # the larger share first
    # span 100 .. 4800 ns = 4.7 us over 2 steps; kernels 3 us over 2; the rest between them
    assert lines[-1] == "GPU span per step 2.35 us; its kernels 1.50 us; between kernels 0.85 us (2.0 kernels a step)"
