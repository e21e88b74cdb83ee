"""tests/sass_loops.py's SASS reading (the tools it runs, ptxas and nvdisasm, are not on
CI machines: its parser is checked here on SASS written out by hand, in nvdisasm -c's form)."""

from __future__ import annotations

from .sass_loops import function_sass, innermost_loops

SASS = """
\t.section\t.text.other,"ax",@progbits
.text.other:
        /*0000*/                   FFMA R1, R2, R3, R1 ;
\t.section\t.text.k,"ax",@progbits
.text.k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, [R4.64] ;
.L_x_1:
        /*0020*/                   LDS R3, [R5] ;
        /*0030*/              @P0  FFMA R6, R3, R3, R6 ;
        /*0040*/                   FFMA R7, R3, R3, R7 ;
        /*0050*/                   HFMA2.MMA R8, -RZ, RZ, 0, 0 ;
        /*0060*/                   FFMA R9, R3, R3, R9 ;
        /*0070*/                   FFMA R10, R3, R3, R10 ;
        /*0080*/                   LD.E R11, [R12.64] ;
        /*0090*/                   @!P1 BRA `(.L_x_1) ;
        /*00a0*/                   @P2 BRA `(.L_x_2) ;
        /*00b0*/                   @!P3 BRA `(.L_x_0) ;
.L_x_2:
        /*00c0*/                   EXIT ;
"""


def test_the_innermost_loop_and_its_counts():
    """Two loops, one inside the other: only the inner one (its label to its backward
    branch), with its 4 multiply-adds (the HFMA2.MMA of zeros is a move), one predicated;
    the forward branch is no loop; the other function's FFMA is not this one's."""
    k = function_sass(SASS, "k")
    assert ".text.other:" not in k and "EXIT" in k
    (loop,) = innermost_loops(k)
    assert loop == {"first": 2, "last": 9, "instructions": 8, "fma": 4, "lds": 1, "ldg": 0, "generic": 1,
                    "branches": 1, "predicated_fma": 1}  # fmt: skip
    assert innermost_loops(k, min_fma=5) == []
