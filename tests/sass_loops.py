"""What a kernel's innermost loops are made of, from its SASS: a CPU aid for the GPU speed
issue (how many instructions the hot loops spend per multiply-add, which loads wait on
stores), for a machine without a GPU.

    PTXAS=/path/ptxas NVDISASM=/path/nvdisasm python3 tests/sass_loops.py mlp.cu mlp_fused_f32 [ARCH]

NVRTC compiles kernels/<file> to PTX as the GPU backend does (gpubp.kernels: our options,
then CuPy's); ptxas and nvdisasm of a CUDA toolkit that knows ARCH (default sm_90)
assemble and disassemble it. The toolkit may be older than NVRTC: the PTX's .version is
lowered to PTX_VERSION (default 7.8, CUDA 11.8's: Debian 12's non-free
nvidia-cuda-toolkit), which holds while the kernels use no newer PTX instruction; its
ptxas schedules as that version does, so counts are close to, not exactly, what the
GPU's driver makes of the PTX. Prints ptxas's registers and stack frame, then per
innermost loop (a backward branch whose body holds no other): instructions, multiply-adds
(FFMA, DFMA, HFMA2), shared loads (LDS), global loads (LDG), generic loads and stores
(LD.E / ST.E: a pointer whose address space the compiler lost), branches, predicated
multiply-adds. Loops of fewer than 4 multiply-adds are left out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")
_FMA = ("FFMA", "DFMA", "HFMA2")


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """(instructions in order, label -> index of the instruction it precedes)."""
    ins: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = _INSTR.search(line)
        if m:
            ins.append(m.group(1))
    return ins, labels


def _opcode(instr: str) -> str:
    words = instr.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def innermost_loops(sass: str, min_fma: int = 4) -> list[dict]:
    """Per innermost loop of one function's SASS (nvdisasm -c), in code order: its
    instruction range and counts (see the module docstring)."""
    ins, labels = instructions(sass)
    loops = []
    for i, instr in enumerate(ins):
        m = _TARGET.search(instr)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append((labels[m.group(1)], i))
    out = []
    for a, b in loops:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops):
            continue  # holds another loop
        body = [_opcode(x) for x in ins[a : b + 1]]
        fma = sum(op.startswith(_FMA) and not op.endswith(".MMA") for op in body)  # HFMA2.MMA RZ: a move
        if fma < min_fma:
            continue
        out.append({
            "first": a, "last": b, "instructions": len(body), "fma": fma,
            "lds": sum(op.startswith("LDS") for op in body), "ldg": sum(op.startswith("LDG") for op in body),
            "generic": sum(op.startswith(("LD.", "ST.")) for op in body),
            "branches": sum(op.startswith("BRA") for op in body),
            "predicated_fma": sum(x.startswith("@") and _opcode(x).startswith(_FMA) for x in ins[a : b + 1]),
        })  # fmt: skip
    return out


def function_sass(sass: str, name: str) -> str:
    """The part of a whole cubin's SASS that is function `name`."""
    start = sass.index(f".text.{name}:")
    end = sass.find("\t.section", start)
    return sass[start : end if end >= 0 else len(sass)]


def main(argv: list[str]) -> None:
    from gpubp import kernels

    file, function = argv[0], argv[1]
    arch = argv[2] if len(argv) > 2 else "sm_90"
    ptxas, nvdisasm = os.environ.get("PTXAS", "ptxas"), os.environ.get("NVDISASM", "nvdisasm")
    ptx = kernels.nvrtc_ptx(file, arch)
    ptx = re.sub(r"^\.version .*$", f".version {os.environ.get('PTX_VERSION', '7.8')}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-O3", "-v", src, "-o", cubin], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"ptxas failed: {r.stderr.strip()[-2000:]}")
        info = [s for s in r.stderr.split(f"'{function}'", 1)[-1].splitlines()[1:4] if "stack" in s or "Used" in s]
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    print(f"{file} {function} ({arch}): " + "; ".join(s.split(" : ", 1)[-1].strip() for s in info))
    for loop in innermost_loops(function_sass(sass, function)):
        print("  loop {first}-{last}: {instructions} instructions, {fma} multiply-adds ({predicated_fma} "
              "predicated), {lds} LDS, {ldg} LDG, {generic} generic LD/ST, {branches} branches".format(**loop))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
