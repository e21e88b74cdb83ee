"""The reference op set: readable NumPy, the specification every backend must match.

Conventions (llm.c style, said once here):
- Row-major batches: x is (N, n_in), W is (n_in, n_out), z = x W + b is (N, n_out).
- Every op writes into `out` (preallocated by the caller) and allocates as little as
  it can; activation gradients are overwritten (=), parameter gradients are
  overwritten too unless `beta=1` asks gemm to accumulate (+=).
- Scalars that change every step (learning rate, gradient scale) may be Python floats
  or 0-d arrays of the backend.
- Mixed precision (gpubp/precision.py): an array of 16-bit storage (bf16 bits as
  uint16, float16) is read as float32, the op computes in float32 and rounds its result
  once into a 16-bit `out` (round to nearest even): what the kernels do, bit for bit in
  the elementwise ops. Parameters (b, W's float32 master) and parameter gradients stay
  float32. `tf32=True` rounds a float32 GEMM's inputs to TF32 first.
"""

from __future__ import annotations

import math

import numpy as np

from .. import precision as PR
from ..activations import Activation
from ..losses import Loss
from .threads import blas_one_thread

# ---------------------------------------------------------------------------------------
# matrix products (cuBLAS on the GPU)


def gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0, tf32=False):
    """out = op(a) @ op(b) + beta * out, op(m) = m.T if trans else m.

    a: (M, K) or (K, M) if trans_a; b: (K, N) or (N, K) if trans_b; out: (M, N).
    The transposes are views: no copy is made. 16-bit a, b (bf16/fp16 storage): their
    float32 values, products summed in float32, as cuBLAS with compute type 32F; a
    16-bit out gets round(acc + beta out) once; a bf16 out with beta != 0 gets
    round(round(acc) + beta out), as cuBLAS's tensor-core kernels compute it (an H100,
    CUDA 13: every element of a 64x48 product bit for bit; its 129x1 product rounded once,
    so the GPU tests allow either, tests/test_precision_gpu.py). tf32: float32 a and b
    rounded to TF32 first (precision.round_tf32), as CUBLAS_COMPUTE_32F_FAST_TF32.
    """
    if a.dtype in PR.LOW or b.dtype in PR.LOW or out.dtype in PR.LOW:
        af, bf = PR.to_float32(a), PR.to_float32(b)
        acc = (af.T if trans_a else af) @ (bf.T if trans_b else bf)
        if beta != 0.0:
            if out.dtype == PR.BF16:
                acc = PR.round_to(acc, PR.BF16)  # the product rounded first
            acc += beta * PR.to_float32(out)
        PR.store(acc, out)
        return out
    if tf32 and a.dtype == np.float32:
        a, b = PR.round_tf32(a), PR.round_tf32(b)
    return matmul_into(a.T if trans_a else a, b.T if trans_b else b, out, beta)


def matmul_into(a, b, out, beta: float):
    """out = a @ b + beta out (a, b already transposed as wanted; a leading model axis
    broadcasts, as np.matmul's does): the one product of gemm and gemm_batched."""
    if beta == 0.0:
        np.matmul(a, b, out=out)
    else:
        if beta != 1.0:
            out *= beta
        out += a @ b
    return out


def cast(src, out):
    """out = src converted to out's storage dtype (16-bit: rounded to nearest even).
    src, out: the same shape; any of bf16 bits, float16, float32, float64."""
    PR.store(PR.to_float32(src) if src.dtype in PR.LOW else src, out)
    return out


def add(a, b, out):
    """out = a + b elementwise (a residual layer's x_k + a_k); 16-bit: in float32, rounded once."""
    if out.dtype in PR.LOW:
        PR.store(PR.to_float32(a) + PR.to_float32(b), out)
    else:
        np.add(a, b, out=out)
    return out


# ---------------------------------------------------------------------------------------
# matrix products with a fused epilogue (cuBLASLt on the GPU: gpubp/backend/cublaslt.py)
#
# A ReLU layer's forward product writes its activation and a bit mask of where it is
# positive; the product of the layer above's backward pass reads that mask, and so gives
# the layer's D' and bias gradient with no elementwise pass of its own. The mask is
# cuBLASLt's: mask[i, j // 8] bit j % 8 is [out[i, j] > 0], each row padded with zero
# bits to a multiple of MASK_ALIGN (uint8, (M, relu_mask_bytes(N))). In float32 these
# references are the unfused ops in the same order, so a model gives the same bits with
# and without them. With 16-bit storage (bf16, fp16) the epilogue works on the float32
# accumulator and rounds once, where the unfused ops round the product, then the sum.

MASK_ALIGN = 128  # bits per row of the mask: a multiple of 128 (cuBLASLt's rule)


def relu_mask_bytes(n_cols: int) -> int:
    """Bytes of one mask row over n_cols columns."""
    return -(-n_cols // MASK_ALIGN) * MASK_ALIGN // 8


def gemm_bias_relu(a, b, bias, out, mask, trans_a=False, trans_b=False, tf32=False) -> bool:
    """v = op(a) op(b) + 1 bias^T;  out = max(v, 0);  mask = bits [v > 0]  (RELU_AUX_BIAS).

    a: (M, K), b: (K, N) (op: as gemm), bias: (N,) float32, out: (M, N), mask: (M,
    relu_mask_bytes(N)) uint8. a, b, out float32, or all of one 16-bit storage: then v is
    the float32 accumulator plus the bias (float32, or of out's storage: cuBLASLt takes a
    float32 bias only with a float32 out), and out = max(v, 0) rounded once. Returns True:
    the product was done (the GPU returns False, having done nothing, where cuBLASLt has
    no algorithm for the case)."""
    if out.dtype in PR.LOW:
        acc = np.empty(out.shape, np.float32)
        gemm(PR.to_float32(a), PR.to_float32(b), acc, trans_a, trans_b)  # float32 products and sums
        np.add(acc, PR.to_float32(bias), out=acc)  # v
        relu_mask_pack(acc > 0, mask)
        PR.store(np.maximum(acc, 0), out)
        return True
    gemm(a, b, out, trans_a, trans_b, tf32=tf32)  # v = op(a) op(b)            (M, N)
    np.add(out, bias, out=out)  # v += 1 bias^T
    relu_mask_pack(out > 0, mask)  # mask = [v > 0]
    np.maximum(out, 0, out=out)  # out = max(v, 0)
    return True


def gemm_bias_act(a, b, bias, act: Activation, out, z=None, tf32=False, window=None) -> bool:
    """z = a b + 1 bias^T;  out = f(z): a layer's forward in one op (on the GPU one
    kernel for a narrow float32 layer, kernels/layer.cu).

    a: (M, K), b: (K, N), bias: (N,), out: (M, N), z: (M, N) or None (f' takes out:
    act.saves != "input"), all of one float dtype. Here the unfused gemm and
    bias_act_forward, bit for bit; the GPU's kernel sums each output's K terms in order,
    a fused multiply-add each, then adds the bias. Or a, b, out, z of 16-bit storage and
    bias float32 (on the GPU bfloat16, layer_tc.cu's tensor cores): v = the float32 sum of
    the products + bias, z = v and out = f(v) each rounded once (cuBLASLt's epilogues'
    rounding; the unfused ops round the product first). Returns True (the GPU returns
    False, having done nothing, where it has no kernel for the layer).
    window (perm, start): a is a whole split's x, row i's its row perm[start + i] (perm
    int64, start a 0-d int64 read when the op runs: the training step's batch, read where
    it lies by a network's first layer); a 16-bit layer's a is then the float32 split,
    its rows rounded to the storage first (the GPU's kernel rounds them as it loads them)."""
    a = _window_rows(a, window, out.shape[0], out.dtype)
    if out.dtype in PR.LOW:
        v = np.empty(out.shape, np.float32)
        gemm(a, b, v)  # v = a b, float32 sums                 (M, N)
        v += bias  # + 1 bias^T
        if z is not None:
            PR.store(v, z)
        PR.store(act_forward(v, act, np.empty_like(v)), out)  # out = f(v), rounded once
        return True
    v = z if z is not None else out
    gemm(a, b, v, tf32=tf32)  # z = a b                           (M, N)
    bias_act_forward(v, bias, act, out)  # z += 1 bias^T, out = f(z)
    return True


def _window_rows(x, window, n: int, storage=None):
    """x's rows perm[start : start + n] where window = (perm, start) is given, else x.
    storage: a layer's, where a 16-bit one takes the rows of a float32 split rounded to it
    (as float32 values), as its kernel rounds x while it loads it (cast's rounding)."""
    if window is None:
        return x
    perm, start = window
    rows = x[perm[int(start) : int(start) + n]]
    return PR.round_to(rows, storage) if storage in PR.LOW else rows


def layer_backward(d, saved, x, w, act: Activation, grad, e=None, tf32=False, window=None, e_act=None,
                   shares=None) -> bool:  # fmt: skip
    """D' = d * f'(saved);  grad = (x^T D' (K, N) row-major, then 1^T D' (N,));  e = D' w^T:
    a layer's backward pass in one op (on the GPU one kernel for a narrow float32 layer,
    kernels/layer.cu, D' never leaving shared memory).

    d, saved: (M, N), x: (M, K), w: (K, N), grad: (K N + N,) (a model's W_k and b_k, in
    its gradient buffer), e: (M, K) or None, all of one float dtype. Here the separate ops,
    bit for bit of the unfused model's backward. Or d, saved, x, w, e of 16-bit storage and
    grad float32 (the GPU's layer_tc.cu, bfloat16): D' = d f'(saved) rounded once, the
    products' input; db the float32 sum of those values, dW = x^T D' in float32, and e
    with e_act = (D' w^T) g'(x) in float32, rounded once. Returns True (the GPU returns False,
    having done nothing, where it has no kernel for the layer). window: as gemm_bias_act's
    (x a whole split's). e_act: the layer below's activation g, whose g' reads its output
    (e_act.saves == "output"), which x is: e = (D' w^T) * g'(x), the layer below's D'
    (act_backward's product). shares (buffer, o): grad's values also as the first of
    buffer's shares, columns o .. o + K N + N - 1, any others 0 (the GPU: its blocks'
    shares, unsummed; the caller sums the buffer: the step's guard. The model asks this
    backend for one share, since a -0 plus 0 would sum to +0)."""
    x = _window_rows(x, window, d.shape[0], d.dtype)
    k, n = w.shape
    dw, db = grad[: k * n].reshape(k, n), grad[k * n :]
    if act.name == "identity":  # D' is D
        dz = d
        bias_grad(dz, db)  # db = 1^T D'                              (N,)
    else:
        dz = np.empty_like(d)
        act_backward_bias_grad(d, saved, act, dz, db)  # D' = d * f'(saved), db = 1^T D'
    gemm(x, dz, dw, trans_a=True, tf32=tf32)  # dW = x^T D'            (K, N)
    if e is not None:
        # 16-bit e with e_act: the product and g'(x) in float32, rounded once
        ef = np.empty(e.shape, np.float32) if e.dtype in PR.LOW and e_act is not None else e
        gemm(dz, w, ef, trans_b=True, tf32=tf32)  # e = D' W^T           (M, K)
        if e_act is not None:
            act_backward(ef, PR.to_float32(x) if ef is not e else x, e_act, out=ef)  # e *= g'(x): the layer below's D'
            if ef is not e:
                PR.store(ef, e)
    if shares is not None:
        buffer, o = shares
        buffer[:, o : o + grad.size] = 0
        buffer[0, o : o + grad.size] = grad
    return True


def gemm_drelu_bias_grad(a, b, mask, out, db, trans_a=False, trans_b=False, tf32=False) -> bool:
    """out = (op(a) op(b)) * mask;  db = 1^T out  (DRELU_BGRAD).

    The backward pass's D' = (D W^T) * f'(z) of the ReLU layer below, and its db, from
    the mask that layer's gemm_bias_relu wrote. a: (M, K), b: (K, N) (op: as gemm),
    mask: (M, relu_mask_bytes(N)) uint8, out: (M, N), db: (N,) float32. a, b, out float32
    (the unfused ops, bit for bit), or all of one 16-bit storage: then the masked float32
    accumulator g is rounded once into out and db sums g (not its rounded values), db
    float32 or of out's storage (rounded once; cuBLASLt's only choice for a 16-bit out).
    Returns True (see gemm_bias_relu)."""
    if out.dtype in PR.LOW:
        g = np.empty(out.shape, np.float32)
        gemm(PR.to_float32(a), PR.to_float32(b), g, trans_a, trans_b)
        np.multiply(g, relu_mask_unpack(mask, out.shape[1]), out=g)
        PR.store(g, out)
        if db.dtype in PR.LOW:
            PR.store(bias_grad(g, np.empty(db.shape, np.float32)), db)
        else:
            bias_grad(g, db)
        return True
    gemm(a, b, out, trans_a, trans_b, tf32=tf32)  # D W^T                       (M, N)
    np.multiply(out, relu_mask_unpack(mask, out.shape[1]), out=out)  # D' = (D W^T) * [z > 0]
    bias_grad(out, db)  # db = 1^T D'                                            (N,)
    return True


def gemm_bias(a, b, bias, out, trans_a=False, trans_b=False, tf32=False) -> bool:
    """out = op(a) op(b) + 1 bias^T  (BIAS): an identity layer's z = x W + b in one product.

    a: (M, K), b: (K, N) (op: as gemm), bias: (N,) float32, out: (M, N); float32 (the
    unfused gemm and bias_act_forward, bit for bit) or all of one 16-bit storage (the
    float32 accumulator plus the bias, float32 or of out's storage, rounded once).
    Returns True (see gemm_bias_relu)."""
    if out.dtype in PR.LOW:
        acc = np.empty(out.shape, np.float32)
        gemm(PR.to_float32(a), PR.to_float32(b), acc, trans_a, trans_b)
        np.add(acc, PR.to_float32(bias), out=acc)
        PR.store(acc, out)
        return True
    gemm(a, b, out, trans_a, trans_b, tf32=tf32)  # x W                         (M, N)
    np.add(out, bias, out=out)  # + 1 b^T
    return True


def gemm_bias_grad(a, b, out, db, trans_a=False, trans_b=False, tf32=False) -> bool:
    """out = op(a) op(b);  db = 1^T op(b)  (BGRADA): a layer's dW = x^T D' with its
    db = 1^T D' in one product (a = x, trans_a; b = D').

    a: (K, M) with trans_a, b: (K, N), out: (M, N), db: (N,) float32. As gemm (16-bit a
    and b with a float32 out: the weight gradients) and bias_grad: the unfused ops, bit
    for bit. Returns True (see gemm_bias_relu)."""
    gemm(a, b, out, trans_a, trans_b, tf32=tf32)  # dW = x^T D'                 (M, N)
    bias_grad(np.ascontiguousarray(b.T) if trans_b else b, db)  # db = 1^T op(b)   (N,)
    return True


def relu_mask_pack(positive, mask) -> None:
    """mask = the bits of the bool matrix `positive` (M, N), little-endian in each byte."""
    n_bytes = -(-positive.shape[1] // 8)
    mask[:, :n_bytes] = np.packbits(positive, axis=1, bitorder="little")
    mask[:, n_bytes:] = 0


def relu_mask_unpack(mask, n_cols: int) -> np.ndarray:
    """The bool matrix (M, n_cols) whose bits `mask` holds."""
    return np.unpackbits(mask, axis=1, count=n_cols, bitorder="little").view(np.bool_)


# ---------------------------------------------------------------------------------------
# activations: forward y = f(z) and local gradient D' = D * f'(.)


def _sigmoid(z, out):
    # sigmoid(z) = 1 / (1 + exp(-z)) for z >= 0, exp(z) / (1 + exp(z)) for z < 0:
    # both branches only ever exponentiate -abs(z), so nothing overflows
    e = np.exp(-np.abs(z))
    np.divide(np.where(z >= 0, 1.0, e), 1.0 + e, out=out)
    return out


_erf = np.frompyfunc(math.erf, 1, 1)  # the C library's erf, as CUDA's erf: no approximation


def _std_normal_cdf(z):
    # Phi(z) = (1 + erf(z / sqrt(2))) / 2, computed in float64
    return 0.5 * (1.0 + _erf(np.asarray(z, dtype=np.float64) * (1.0 / math.sqrt(2.0))).astype(np.float64))


GELU_TANH_C = math.sqrt(2.0 / math.pi)  # c in gelu_tanh
GELU_TANH_K = 0.044715


def act_forward(z, act: Activation, out):
    """out = f(z), elementwise. z, out: (N, n); out may be z (in place)."""
    name = act.name
    if name == "identity":
        if out is not z:
            np.copyto(out, z)
    elif name == "relu":
        np.maximum(z, 0, out=out)
    elif name == "leaky_relu":
        # z if z > 0 else alpha z
        np.copyto(out, np.where(z > 0, z, act.alpha * z))
    elif name == "elu":
        # z if z > 0 else exp(z) - 1   (alpha = 1)
        np.copyto(out, np.where(z > 0, z, np.expm1(np.minimum(z, 0))))
    elif name == "gelu":
        # z Phi(z)
        np.copyto(out, z * _std_normal_cdf(z))
    elif name == "gelu_tanh":
        # z/2 (1 + tanh(c (z + k z^3)))
        np.copyto(out, 0.5 * z * (1.0 + np.tanh(GELU_TANH_C * (z + GELU_TANH_K * z * z * z))))
    elif name == "silu":
        # z sigmoid(z)
        s = _sigmoid(z, np.empty_like(z))
        np.multiply(z, s, out=out)
    elif name == "tanh":
        np.tanh(z, out=out)
    elif name == "sigmoid":
        _sigmoid(z, out)
    elif name == "softplus":
        # log(1 + exp(z)) = max(z, 0) + log(1 + exp(-abs(z)))
        np.copyto(out, np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))))
    else:
        raise ValueError(f"unknown activation {name!r}")
    return out


def act_backward(d, saved, act: Activation, out):
    """out = d * f'(.), elementwise. d, saved, out: (N, n); out may be d (in place).

    `saved` is y = f(z) for activations whose f' is read from the output (act.saves
    == "output"), z for those that need the input ("input"), ignored for identity.
    16-bit d, saved, out: d * f'(saved) in float32, rounded once into out.
    """
    if d.dtype in PR.LOW:
        df = PR.to_float32(d)
        PR.store(act_backward(df, PR.to_float32(saved), act, np.empty_like(df)), out)
        return out
    name = act.name
    if name == "identity":
        # f' = 1
        if out is not d:
            np.copyto(out, d)
    elif name == "relu":
        # f'(y) = [y > 0]
        np.multiply(d, saved > 0, out=out)
    elif name == "leaky_relu":
        # f'(y) = 1 if y > 0 else alpha   (alpha >= 0, so y > 0 exactly when z > 0)
        np.multiply(d, np.where(saved > 0, 1.0, act.alpha).astype(d.dtype), out=out)
    elif name == "elu":
        # f'(y) = 1 if y > 0 else y + 1   (exp(z) = y + 1 on the negative side)
        np.multiply(d, np.where(saved > 0, 1.0, saved + 1.0).astype(d.dtype, copy=False), out=out)
    elif name == "gelu":
        # f'(z) = Phi(z) + z phi(z), phi(z) = exp(-z^2/2) / sqrt(2 pi)
        z = saved
        phi = np.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        np.multiply(d, (_std_normal_cdf(z) + z * phi).astype(d.dtype, copy=False), out=out)
    elif name == "gelu_tanh":
        # u = c (z + k z^3), t = tanh(u)
        # f'(z) = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 k z^2)
        z = saved
        t = np.tanh(GELU_TANH_C * (z + GELU_TANH_K * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_TANH_C * (1.0 + 3.0 * GELU_TANH_K * z * z)
        np.multiply(d, g, out=out)
    elif name == "silu":
        # s = sigmoid(z), f'(z) = s (1 + z (1 - s))
        z = saved
        s = _sigmoid(z, np.empty_like(z))
        np.multiply(d, s * (1.0 + z * (1.0 - s)), out=out)
    elif name == "tanh":
        # f'(y) = 1 - y^2
        np.multiply(d, 1.0 - saved * saved, out=out)
    elif name == "sigmoid":
        # f'(y) = y (1 - y)
        np.multiply(d, saved * (1.0 - saved), out=out)
    elif name == "softplus":
        # f'(z) = sigmoid(z) = 1 - exp(-y), as -expm1(-y) to keep small values exact
        np.multiply(d, -np.expm1(-saved), out=out)
    else:
        raise ValueError(f"unknown activation {name!r}")
    return out


def bias_act_forward(z, b, act: Activation, out):
    """z += b (broadcast over rows), then out = f(z).

    z: (N, n) the GEMM result x W, updated in place to the pre-activation x W + b;
    b: (n,); out: (N, n), may be z itself when f' needs no z (act.saves != "input").
    16-bit z, out (b float32): v = z + b and f(v) in float32, each stored rounded.
    """
    if z.dtype in PR.LOW:
        v = PR.to_float32(z) + b
        if out is not z:
            PR.store(v, z)
        PR.store(act_forward(v, act, np.empty_like(v)), out)
        return out
    np.add(z, b, out=z)
    return act_forward(z, act, out)


def bias_grad(d, out):
    """out = column sums of d: db = sum_i D'_i = 1^T D'. d: (N, n); out: (n,).

    As a GEMV with a ones vector: BLAS does it faster than np.sum(axis=0), adding the
    rows in the same sequential order. 16-bit d: summed in float32 into a float32 out."""
    if d.dtype in PR.LOW:
        d = PR.to_float32(d)
    np.matmul(_ones(d.shape[0], d.dtype), d, out=out)
    return out


def act_backward_bias_grad(d, saved, act: Activation, out, db):
    """out = d * f'(.) (act_backward) and db = its column sums (bias_grad), in one op: a
    layer's backward before its weight gradient. d, saved, out: (N, n), out may be d;
    db: (n,). The GPU does both in one pass over d (its sums are of the values it writes)."""
    act_backward(d, saved, act, out)
    return bias_grad(out, db)


_ONES: dict = {}


def _ones(n: int, dtype) -> np.ndarray:
    """A cached read-only vector of n ones."""
    key = (n, np.dtype(dtype))
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) > 8:
            _ONES.clear()
        ones = _ONES[key] = np.ones(n, dtype=dtype)
        ones.flags.writeable = False
    return ones


# ---------------------------------------------------------------------------------------
# losses: value (0-d array) and gradient dL/dx in one call


def loss_divisor(loss: Loss, n: int, c: int) -> int:
    """What the batch mean divides by: N rows for softmax_cross_entropy, N C elements else."""
    return n if loss.info.target == "labels" else n * c


LOSS_BLOCK = 32768  # elements per block of rows in loss_forward_backward


def loss_forward_backward(x, target, loss: Loss, grad=None, loss_scale=None, out=None, window=None):
    """Mean loss over the batch, and grad = dL/dx when grad is not None.

    x: (N, C) network output; target: (N,) integer labels for softmax_cross_entropy,
    (N, C) values otherwise; grad: (N, C) or None. Returns a 0-d array of x.dtype
    (`out`, when given: a captured step writes only into buffers it holds).
    window (perm, start): target is a whole split's, and row i's is its row
    perm[start + i] (perm int64, start a 0-d int64, read when the op runs: the training
    step's batch, its targets read where they lie instead of gathered first).
    Rows go through loss_sum in blocks of about LOSS_BLOCK elements, so that the
    formulas' temporaries stay small (a large batch would otherwise allocate, and
    page-fault, several arrays of its size); the blocks' sums are added in order.

    16-bit x and grad (mixed precision): the loss of x's float32 values, a float32
    value; grad = round(dL/dx * loss_scale), loss_scale a 0-d float32 array (fp16's
    dynamic loss scale; None: 1). The value is never scaled.
    """
    target = _window_rows(target, window, x.shape[0])
    if x.dtype in PR.LOW:
        gf = None if grad is None else np.empty(grad.shape, np.float32)
        value = loss_forward_backward(PR.to_float32(x), target, loss, gf)
        if grad is not None:
            if loss_scale is not None:
                gf *= loss_scale
            PR.store(gf, grad)
        if out is None:
            return value
        out[...] = value
        return out
    n, c = x.shape
    divisor = loss_divisor(loss, n, c)
    rows = max(1, LOSS_BLOCK // c)
    if n <= rows:
        total = loss_sum(x, target, loss, grad, divisor)
    else:
        sums = [
            loss_sum(x[r : r + rows], target[r : r + rows], loss, None if grad is None else grad[r : r + rows], divisor)
            for r in range(0, n, rows)
        ]
        total = np.sum(sums, dtype=x.dtype)
    mean = np.asarray(total / divisor, dtype=x.dtype)
    if out is None:
        return mean
    out[...] = mean
    return out


def loss_sum(x, target, loss: Loss, grad, divisor: int):
    """The sum of the rows' losses (0-d, x.dtype), and grad = d(sum / divisor)/dx when
    grad is not None: the mean's gradient, for a block of the batch's rows."""
    if loss.name == "softmax_cross_entropy":
        total = cross_entropy_rows(x, target, loss.label_smoothing, grad, 1.0 / divisor).sum()
    else:
        total = elementwise_loss(x, target, loss, grad, 1.0 / divisor).sum()
    return np.asarray(total, dtype=x.dtype)


def cross_entropy_rows(x, labels, eps: float, grad, scale: float):
    """Softmax cross-entropy per row, and grad = scale dL/dx when grad is not None.
    x: (..., N, C); labels: (..., N) integers; grad: x's shape or None. Returns (..., N).

        logp = x - logsumexp(x); q = (1 - e) onehot(y) + e / C
        L_row = -sum_c q_c logp_c;   dL_row/dx = softmax(x) - q
    """
    c = x.shape[-1]
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    logp = shifted - lse
    idx = np.broadcast_to(labels, x.shape[:-1])[..., None].astype(np.intp)
    nll = -np.take_along_axis(logp, idx, axis=-1)[..., 0]
    per_row = (1.0 - eps) * nll - (eps / c) * logp.sum(axis=-1) if eps else nll
    if grad is not None:
        np.exp(logp, out=grad)
        grad -= eps / c
        np.put_along_axis(grad, idx, np.take_along_axis(grad, idx, axis=-1) - (1.0 - eps), axis=-1)
        grad *= scale
    return per_row


def elementwise_loss(x, target, loss: Loss, grad, scale: float):
    """The loss of each output element for binary_cross_entropy, mse and huber (x's
    shape), and grad = scale dl/dx when grad is not None. x, target: same shape (or
    target broadcasting to x)."""
    name = loss.name
    if name == "binary_cross_entropy":
        # l = max(x, 0) - x t + log(1 + exp(-abs(x)));   dl/dx = sigmoid(x) - t
        terms = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
        if grad is not None:
            _sigmoid(x, grad)
            grad -= target
            grad *= scale
    elif name == "mse":
        # l = r^2, r = x - t;   dl/dx = 2 r
        r = x - target
        terms = r * r
        if grad is not None:
            np.multiply(r, 2.0 * scale, out=grad)
    elif name == "huber":
        # l = r^2 / 2 if abs(r) < d else d (abs(r) - d / 2);  dl/dx = r if abs(r) < d else d sign(r)
        delta = loss.huber_delta
        r = x - target
        a = np.abs(r)
        quad = a < delta
        terms = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
        if grad is not None:
            np.multiply(np.where(quad, r, delta * np.sign(r)), scale, out=grad)
    else:
        raise ValueError(f"unknown loss {name!r}")
    return terms


def mlp_forward_backward(x, target, params, grads, sizes, activations, loss: Loss, out, window=None):
    """A plain MLP's forward pass, loss and backward pass as one op (the GPU runs it as one
    kernel for narrow layers, kernels/mlp.cu):

        A_0 = x;  z_k = A_k W_k + b_k;  A_{k+1} = f_k(z_k)                      k = 0..l-1
        out, D = loss_forward_backward(A_l, target)                             D = dLoss/dA_l
        D' = D * f_k'(.);  dW_k = A_k^T D';  db_k = sum_rows D';  D = D' W_k^T  k = l-1..0

    x: (N, n_0) float32 or float64; target as loss_forward_backward's; params, grads: (P,)
    flat buffers, W_k (n_k, n_{k+1}) row-major then b_k, layer after layer
    (model.param_layout(sizes)); activations: the l layers' Activation; out: 0-d, the mean
    loss. Returns the gradient's shares: an (S, P) array whose sum over its rows is the
    gradient (the GPU may leave a share per block of rows, summed by sum_shares or by the
    guard, step_guard_norm(..., shares)); here one share, grads itself, written. The GPU
    returns None, having done nothing, where the kernel does not fit the network.
    window (perm, start, n): x and target are a whole split and the batch is its rows
    perm[start : start + n] (perm int64 (N,), start a 0-d int64: the training step's
    epoch order and position, read when the op runs), as gather_windows would give them."""
    if window is not None:
        perm, start, n = window
        rows = perm[int(start) : int(start) + n]
        x, target = x[rows], target[rows]
    views, offset = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w, b = offset + fan_in * fan_out, offset + fan_in * fan_out + fan_out
        views.append((params[offset:w].reshape(fan_in, fan_out), params[w:b], grads[offset:w].reshape(fan_in, fan_out),
                      grads[w:b]))  # fmt: skip
        offset = b
    a = [x]  # A_k
    saved = []  # what f_k' reads: z_k or A_{k+1}
    for (W, b, _, _), act in zip(views, activations):
        z = np.empty((x.shape[0], W.shape[1]), x.dtype)
        gemm(a[-1], W, z)
        y = bias_act_forward(z, b, act, np.empty_like(z))
        a.append(y)
        saved.append(z if act.saves == "input" else y)
    d = np.empty_like(a[-1])
    loss_forward_backward(a[-1], target, loss, d, out=out)
    for k in reversed(range(len(views))):
        W, _, dW, db = views[k]
        act_backward(d, saved[k], activations[k], out=d)  # D' = D * f_k'(.)
        gemm(a[k], d, dW, trans_a=True)  # dW_k = A_k^T D'
        bias_grad(d, db)  # db_k = sum_rows D'
        if k > 0:
            d_prev = np.empty_like(a[k])
            gemm(d, W, d_prev, trans_b=True)  # D = D' W_k^T
            d = d_prev
    return grads[None]


def sum_shares(shares, g):
    """g = sum_s shares[s], s in order: the gradient from its shares (S, P) into g (P,)
    (see mlp_forward_backward); nothing to do when the one share is g itself."""
    if shares.shape[0] == 1 and np.shares_memory(shares, g):
        return g
    g[...] = shares[0]
    for s in shares[1:]:
        g += s
    return g


def accuracy_count(x, labels, threshold=0.0):
    """Number of rows classified right, as a 0-d int64 array.

    x: (N, C) network output; labels: (N,) integer classes. C > 1: the class is
    argmax_c x_ic. C == 1 (binary): the class is [x_i0 > threshold]. 16-bit x: its values.
    """
    x = PR.to_float32(x)
    if x.shape[1] == 1:
        pred = x[:, 0] > threshold
    else:
        pred = x.argmax(axis=1)
    return np.asarray(np.count_nonzero(pred == labels), dtype=np.int64)


# ---------------------------------------------------------------------------------------
# optimizers over the flat buffers (torch.optim's update rules, single-tensor path)


def sgd_step(p, g, buf, scratch, *, lr, momentum, dampening, nesterov, weight_decay, first_step, grad_scale=1.0,
             skip=None):  # fmt: skip
    """One SGD step over flat buffers p, g, buf (momentum): (P,); scratch: (2, P).
    skip: None, or a 0-d boolean: when true nothing changes (a non-finite step).

    d = s g + wd p             (s: gradient scale from clipping)
    buf = d                    on the first step,
    buf = mu buf + (1 - damp) d afterwards          (when mu != 0)
    d = d + mu buf if nesterov else buf
    p = p - lr d
    """
    if skip is not None and skip:
        return
    d, t = scratch[0], scratch[1]  # no temporaries: every product lands in t
    d = _scaled(g, grad_scale, d, bool(weight_decay) or (bool(momentum) and nesterov))
    if weight_decay:
        np.multiply(p, weight_decay, out=t)
        d += t
    if momentum:
        d = momentum_direction(d, buf, t, momentum, 1.0 - dampening, first_step, nesterov)
    np.multiply(d, lr, out=t)
    p -= t


def momentum_direction(d, buf, t, momentum, one_minus_dampening, first_step: bool, nesterov: bool):
    """SGD momentum in place, t a scratch row; returns the update direction:
    buf = d (first step) or mu buf + (1 - damp) d;  direction = d + mu buf (nesterov) or buf.
    mu, 1 - damp: scalars, or (M, 1) per-model vectors over (M, P) rows (numpy_stacked)."""
    if first_step:
        np.copyto(buf, d)
    else:
        buf *= momentum
        np.multiply(d, one_minus_dampening, out=t)
        buf += t
    if nesterov:
        np.multiply(buf, momentum, out=t)
        d += t
        return d
    return buf


def adam_step(p, g, m, v, scratch, *, lr, beta1, beta2, eps, weight_decay, step, decoupled, grad_scale=1.0,
              skip=None):  # fmt: skip
    """One Adam (decoupled=False) or AdamW (decoupled=True) step; t = step >= 1.
    p, g, m, v: (P,); scratch: (2, P). skip: as in sgd_step.

    d = s g (+ wd p for Adam)          p = p (1 - lr wd)   for AdamW
    m = m + (1 - b1) (d - m)           v = b2 v + (1 - b2) d^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    if skip is not None and skip:
        return
    d, t = scratch[0], scratch[1]  # no temporaries: every product lands in t
    d = _scaled(g, grad_scale, d, bool(weight_decay) and not decoupled)
    if weight_decay:
        if decoupled:
            p *= 1.0 - lr * weight_decay
        else:
            np.multiply(p, weight_decay, out=t)
            d += t
    np.subtract(d, m, out=t)  # m += (1 - b1) (d - m)
    t *= 1.0 - beta1
    m += t
    v *= beta2  # v += (1 - b2) d d
    np.multiply(d, 1.0 - beta2, out=t)
    t *= d
    v += t
    step_size = lr / (1.0 - beta1**step)
    bias2_sqrt = math.sqrt(1.0 - beta2**step)
    den = scratch[0]  # d is spent; when d is g itself, scratch[0] is still free
    np.sqrt(v, out=den)  # denominator sqrt(v) / sqrt(1 - b2^t) + eps
    den /= bias2_sqrt
    den += eps
    np.multiply(m, step_size, out=t)  # p -= step_size m / denominator
    t /= den
    p -= t


def _scaled(g, grad_scale, d, will_add):
    """d = s g; g itself when s is the Python 1.0 and nothing will be added to d."""
    if isinstance(grad_scale, float) and grad_scale == 1.0 and not will_add:
        return g
    np.multiply(g, grad_scale, out=d)
    return d


def sum_squares(g, out=None):
    """sum_j g_j^2 over a flat buffer (P,), as a 0-d array (`out` when given): the squared global norm.

    One BLAS DOT on one OpenBLAS thread: threaded, OpenBLAS splits a float64 DOT of over
    10,000 elements into per-thread partial sums, whose bits then depend on the thread
    count (and a sweep's blocks run theirs on one thread)."""
    with blas_one_thread():
        value = np.dot(g, g)
    if out is None:
        return np.asarray(value)
    out[...] = value
    return out


def step_guard(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale):
    """The verdict on one step before its update, all 0-d arrays, nothing read back:

        first_bad = step            if first_bad == -1 and (loss or grad_sq is not finite)
        skip      = first_bad >= 0  (the update leaves parameters and state as they are)
        norm      = sqrt(grad_sq)   the global gradient 2-norm
        scale     = min(1, max_norm / (norm + 1e-6)) if max_norm > 0 else 1
                                    (torch.nn.utils.clip_grad_norm_'s factor)

    loss, grad_sq, norm, scale: dtype T; first_bad: int64; skip: bool; step: an int or a
    0-d int64 array (the trainer's device-side step counter)."""
    t = norm.dtype.type
    if first_bad == -1 and not (np.isfinite(loss) and np.isfinite(grad_sq)):
        first_bad[...] = step
    skip[...] = first_bad >= 0
    norm[...] = np.sqrt(grad_sq.astype(norm.dtype))
    scale[...] = min(t(1), t(max_norm) / (norm + t(1e-6))) if max_norm > 0 else t(1)


def step_guard_norm(loss, g, grad_sq, step, max_norm, first_bad, skip, norm, scale, shares=None, advance=None):
    """grad_sq = sum_j g_j^2 (sum_squares of the flat gradients g (P,), into the 0-d
    grad_sq), then step_guard(loss, grad_sq, ...): the step's verdict from its gradients,
    one launch on the GPU (the block that finishes the sum runs the guard). shares: the
    gradient still in shares (S, P) (mlp_forward_backward's), first summed into g
    (sum_shares), in the same launch. advance (running, pos) or (running, pos, now,
    ahead): then the step's bookkeeping in the same launch too (step_advance_selecting:
    the step's select folded in, no launch of its own)."""
    if shares is not None:
        sum_shares(shares, g)
    sum_squares(g, out=grad_sq)
    step_guard(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale)
    if advance is not None:
        step_advance_selecting(advance[0], loss, *advance[1:])


def step_guard_scaled_norm(loss, g, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps,
                           skipped, interval=PR.LOSS_SCALE_INTERVAL):  # fmt: skip
    """grad_sq = sum_j g_j^2 (the float32 flat gradients, scaled by S), then
    step_guard_scaled: fp16's verdict from its gradients, one launch on the GPU."""
    sum_squares(g, out=grad_sq)
    step_guard_scaled(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps, skipped,
                      interval)  # fmt: skip


def step_guard_scaled(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps, skipped,
                      interval=PR.LOSS_SCALE_INTERVAL):  # fmt: skip
    """step_guard for fp16 with dynamic loss scaling (torch.cuda.amp.GradScaler's rule):
    the gradients are S g, S = loss_scale (0-d float32), so grad_sq = S^2 |g|^2.

        first_bad = step        if first_bad == -1 and the loss is not finite (divergence:
                                the loss is float32 and unscaled)
        overflow  = grad_sq is not finite       (S g overflowed: skip this step only)
        skip      = first_bad >= 0 or overflow
        norm      = sqrt(grad_sq) / S           the true gradient's 2-norm
        scale     = min(1, max_norm / (norm + 1e-6)) / S   (1 / S without clipping): the
                                                optimizer's factor, the unscaling included
    then, while first_bad == -1:
        overflow:   S = S / 2, good_steps = 0, skipped += 1
        else:       good_steps += 1; at `interval`: S = 2 S (if finite), good_steps = 0

    good_steps, skipped: 0-d int64. Nothing is read back to the host on the GPU."""
    t = norm.dtype.type
    s = loss_scale.astype(norm.dtype)
    if first_bad == -1 and not np.isfinite(loss):
        first_bad[...] = step
    overflow = not np.isfinite(grad_sq)
    skip[...] = (first_bad >= 0) or overflow
    norm[...] = np.sqrt(grad_sq.astype(norm.dtype)) / s
    clip = min(t(1), t(max_norm) / (norm + t(1e-6))) if max_norm > 0 else t(1)
    scale[...] = clip / s
    if first_bad >= 0:
        return
    if overflow:
        loss_scale[...] = loss_scale * np.float32(PR.LOSS_SCALE_BACKOFF)
        good_steps[...] = 0
        skipped[...] = skipped + 1
    else:
        good_steps[...] = good_steps + 1
        if good_steps == interval:
            grown = loss_scale * np.float32(PR.LOSS_SCALE_GROWTH)
            if np.isfinite(grown):
                loss_scale[...] = grown
            good_steps[...] = 0


def gather_rows(src, idx, out):
    """out[i] = src[idx[i]]. src: (M, ...); idx: (N,) integers; out: (N, ...)."""
    np.take(src, idx, axis=0, out=out)
    return out


def gather_windows(srcs, perm, start, outs):
    """outs[k][i] = srcs[k][perm[start + i]] for each (src, out) pair: a batch's rows (its
    features and its targets, one launch on the GPU) from a window of an epoch's order,
    with no index buffer between (index_window and gather_rows in one).
    srcs: sequence of (M, ...); perm: (P,) integers; start: 0-d int64 array (read when
    the op runs); outs: sequence of (N, ...), one per src, of its dtype, or for a float32
    x a 16-bit out: its rows rounded as they move (cast's rounding: the step's gather for
    a bf16 or fp16 model). Returns outs."""
    s = int(start)
    for src, out in zip(srcs, outs, strict=True):
        rows = perm[s : s + out.shape[0]]
        if out.dtype == src.dtype:
            np.take(src, rows, axis=0, out=out)
        else:
            cast(np.take(src, rows, axis=0), out)
    return outs


# ---------------------------------------------------------------------------------------
# device-side step state (gpubp/step.py): what changes between steps is read on the device


def select_rows(tables, pos, outs):
    """outs[k] = tables[k][pos] for each (table, out) pair: this step's rows of precomputed
    per-step tables (one launch on the GPU for two). tables: sequence of (K, ...); pos: 0-d
    int64 array (the row, a device counter); outs: sequence, each its table[0]'s shape."""
    for table, out in zip(tables, outs, strict=True):
        np.take(table, pos, axis=0, out=out)
    return outs


def step_advance(running, loss, pos, ahead=()):
    """The step's last op: running += loss (the running loss sum: 0-d, or (M,) for M
    stacked models, in running's dtype) and pos += 1 (the tables' row, 0-d int64), in
    place, one launch on the GPU. ahead: (table, out) pairs (at most 3, tables of the same
    rows), each out = table[pos] at the new pos where the tables have that row: the next
    step's rows (gpubp/step.py: nothing after the advance reads them, so no step selects
    its own; the host writes a chunk's first row when it uploads the tables)."""
    if len(ahead) > 3:
        raise ValueError(f"step_advance: at most 3 ahead pairs, got {len(ahead)}")
    np.add(running, loss, out=running)
    np.add(pos, 1, out=pos)
    for table, out in ahead:
        if int(pos) < table.shape[0]:
            select_rows([table], pos, [out])


def step_advance_selecting(running, loss, pos, now=(), ahead=()):
    """step_advance where the guard advances (before the update), this step's rows selected
    too:

        outs = tables[pos]      for (table, out) in now: what the rest of this step reads
                                (the update's numbers), at the row of this step
        running += loss;  pos += 1
        outs = tables[pos]      for (table, out) in ahead, where the table has that row:
                                what the next step reads first (where its batch starts)

    now: at most two pairs, ahead at most one (the guard kernel's arguments)."""
    if len(now) > 2 or len(ahead) > 1:
        raise ValueError(f"step_advance_selecting: at most 2 now and 1 ahead pairs, got {len(now)} and {len(ahead)}")
    select_rows([t for t, _ in now], pos, [o for _, o in now])
    step_advance(running, loss, pos, ahead)


def update_vectors(rates, pos, counts, t0, updates, skip, vectors, first_step, bias_corrected):
    """This update's optimizer numbers from two device counters (fp16, where a skipped step
    takes no update and the run goes on: the schedule follows the steps, Adam's bias
    corrections and SGD's first momentum step the updates taken, as with GradScaler).

    rates  (K, 2, M) float64   per step: lr, 1 - lr wd (the host's Python floats)
    counts (K, 2, M) float64   per update t = t0 + 1 + r: 1 - b1^t, sqrt(1 - b2^t)
    pos, t0, updates: 0-d int64 (the step's row; the table's first update - 1; updates taken)
    skip: 0-d bool, this step's verdict (the guard's); vectors (R, M, 1), first_step 0-d bool

        lr, decay = rates[pos]               this step's
        c1, c2    = counts[updates - t0]      update t = updates + 1
        Adam (R = 3): vectors = [decay, lr / c1, c2]     SGD (R = 1): vectors = [lr]
        first_step = updates == 0
        updates   += 1 unless skip

    lr / c1 is divided in float64 and then rounded once to vectors' dtype, as the host's
    Python floats are stored (StackAdam.step_table): the same bits."""
    lr, decay = rates[int(pos)]
    u = int(updates)
    if bias_corrected:
        c1, c2 = counts[u - int(t0)]
        for r, value in enumerate((decay, lr / c1, c2)):
            vectors[r, :, 0] = value  # float64 -> vectors' dtype: rounded to nearest even
    else:
        vectors[0, :, 0] = lr
    first_step[...] = u == 0
    if not skip:
        updates[...] = u + 1


def index_window(perm, start, out):
    """out[i] = perm[start + i], i < N: a batch's row indices from the epoch's order.
    perm: (n,) integers; start: 0-d int64 array; out: (N,) of perm's dtype."""
    np.take(perm, np.arange(out.shape[0]) + start, out=out)
    return out
