// layer.cu: a narrow dense layer's forward product with its bias and activation as the
// product's epilogue, one kernel:
//   z = x W + b,  a = f(z)        x: (n, K), W: (K, N), b: (N,), z and a: (n, N), float32
// For narrow layers (K and N of tens, many rows) cuBLAS's product and the elementwise pass
// after it are each a pass over an (n, N) matrix at a fraction of the HBM's rate (narrow
// float32 on an H100: 102 us a product of 262144 x 64 x 64, whose traffic is about 43 us,
// then 78 us of bias_act_forward; docs/benchmarks.md). Here x is read once, and a (and z,
// where f' takes it) written once.
//
// Block tile: LAYER_BM rows x all N <= LAYER_BN columns of the output (block b: rows
// b LAYER_BM ..), K in stages of LAYER_BK: the stage's x rows and W rows in shared memory,
// then each thread's LAYER_TM x LAYER_TN sums in registers, rows ty + 16 q and columns
// tx + 16 m (tx = t % 16, ty = t / 16):
// - a W row's 16 columns of a half warp are 16 consecutive words (no bank conflict), as are
//   the columns its outputs go to (coalesced stores);
// - a thread reads its rows' x four k at a time (16-byte shared loads); the row stride
//   LAYER_LDX = LAYER_BK + 4 keeps rows 16-byte aligned and puts a warp's two rows
//   (ty, ty + 1) in different banks.
// Per four k a thread makes 8 16-byte loads of x and 16 loads of W for 128 multiply-adds.
// Each output's sum runs over k = 0..K-1 in order, a fused multiply-add a term from 0, then
// + b[j]: the grid changes the speed, not the bits.
#include "common.cuh"
#include "activations.cuh"

#define LAYER_THREADS 256                // threads per block (the launcher's)
#define LAYER_TM 8                       // rows a thread: ty + 16 q, q < LAYER_TM
#define LAYER_TN 4                       // columns a thread: tx + 16 m, m < LAYER_TN
#define LAYER_BM (16 * LAYER_TM)         // rows a block tile: 128
#define LAYER_BN (16 * LAYER_TN)         // columns a block tile: 64
#define LAYER_BK 32                      // k a stage
#define LAYER_LDX (LAYER_BK + 4)         // the x stage's row stride
#define LAYER_X_LOADS (LAYER_BM * LAYER_BK / LAYER_THREADS)  // x values a thread stages: 16
#define LAYER_W_LOADS (LAYER_BK * LAYER_BN / LAYER_THREADS)  // W values a thread stages: 8

// x: (n, K), W: (K, N), b: (N,) row-major; a: (n, N) = f(x W + b); z: (n, N) = x W + b where
// keep_z (f' takes z), else not written (f' takes a). a and z must not overlap x (another
// block may still read it). N <= LAYER_BN. Grid: ceil(n / LAYER_BM) blocks of LAYER_THREADS
// threads. Two blocks an SM at least: at most 128 registers a thread (119; 163 before the
// stage's loads shared one address: tests/sass_loops.py).
// WINDOWED (layer_forward_rows_f32, a network's first layer in the training step): x's row r
// is row perm[start[0] + r] of a whole split's x (the batch read where it lies, no gather
// first); the block's rows' places are read once, into shared memory.
template <bool WINDOWED>
__device__ __forceinline__ void layer_forward(const float* x, const long long* perm, const long long* start,
                                              const float* W, const float* b, float* z, float* a, int n, int K,
                                              int N, int keep_z, int kind, float alpha) {
  __shared__ __align__(16) float xs[LAYER_BM * LAYER_LDX];  // x[row0 + r, k0 + kk] at r LDX + kk
  __shared__ float ws[LAYER_BK * LAYER_BN];                  // W[k0 + kk, j] at kk BN + j
  __shared__ long long places[WINDOWED ? LAYER_BM : 1];      // WINDOWED: x's row of row0 + r (-1: past n)
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const long long row0 = (long long)blockIdx.x * LAYER_BM;
  if (WINDOWED) {
    if (t < LAYER_BM) places[t] = row0 + t < n ? perm[start[0] + row0 + t] : -1LL;
    __syncthreads();
  }
  float acc[LAYER_TM][LAYER_TN];
  UNROLL for (int q = 0; q < LAYER_TM; ++q) UNROLL for (int m = 0; m < LAYER_TN; ++m) acc[q][m] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += LAYER_BK) {
    // the stage: x's rows and W's rows k0 .. k0 + BK - 1 (0 past n, K, N), every load of a
    // thread issued before its stores; after the block is done with the previous stage
    // thread t takes x[row0 + t / BK + u (THREADS / BK), k0 + t % BK] and
    // W[k0 + t / BN + u (THREADS / BN), t % BN]: a warp one x row's 32 consecutive k
    float xv[LAYER_X_LOADS], wv[LAYER_W_LOADS];
    if (WINDOWED) {
      const int r = t / LAYER_BK, k = k0 + t % LAYER_BK;
      UNROLL for (int u = 0; u < LAYER_X_LOADS; ++u) {
        const long long p = places[r + u * (LAYER_THREADS / LAYER_BK)];
        xv[u] = p >= 0 && k < K ? x[p * K + k] : 0.0f;
      }
    } else {
      const long long r = row0 + t / LAYER_BK;
      const int k = k0 + t % LAYER_BK;
      const float* from = x + r * K + k;
      UNROLL for (int u = 0; u < LAYER_X_LOADS; ++u)
        xv[u] = r + u * (LAYER_THREADS / LAYER_BK) < n && k < K ? from[(long long)u * (LAYER_THREADS / LAYER_BK) * K]
                                                                : 0.0f;
    }
    {
      const int k = k0 + t / LAYER_BN, j = t % LAYER_BN;
      const float* from = W + (long long)k * N + j;
      UNROLL for (int u = 0; u < LAYER_W_LOADS; ++u)
        wv[u] = k + u * (LAYER_THREADS / LAYER_BN) < K && j < N ? from[(long long)u * (LAYER_THREADS / LAYER_BN) * N]
                                                               : 0.0f;
    }
    __syncthreads();
    UNROLL for (int u = 0; u < LAYER_X_LOADS; ++u) {
      const int e = t + u * LAYER_THREADS;
      xs[e / LAYER_BK * LAYER_LDX + e % LAYER_BK] = xv[u];
    }
    UNROLL for (int u = 0; u < LAYER_W_LOADS; ++u) ws[t + u * LAYER_THREADS] = wv[u];
    __syncthreads();
    // acc[q][m] += x[row, k] W[k, col] for the stage's k in order (past K: 0 x 0, four at
    // a time; a sum of -0 terms alone would end +0, which + b[j] makes moot but for b = -0)
    const int kn = min(LAYER_BK, K - k0);
    const float* xrow = xs + ty * LAYER_LDX;
    const float* wcol = ws + tx;
    for (int kq = 0; kq < kn; kq += 4) {
      float4 xq[LAYER_TM];  // x[row, kq .. kq + 3] of each of the thread's rows
      UNROLL for (int q = 0; q < LAYER_TM; ++q) xq[q] = *(const float4*)(xrow + 16 * q * LAYER_LDX + kq);
      UNROLL for (int u = 0; u < 4; ++u) {
        float w[LAYER_TN];
        UNROLL for (int m = 0; m < LAYER_TN; ++m) w[m] = wcol[(kq + u) * LAYER_BN + 16 * m];
        UNROLL for (int q = 0; q < LAYER_TM; ++q) UNROLL for (int m = 0; m < LAYER_TN; ++m)
          acc[q][m] = fmaf(word_part(xq[q], u), w[m], acc[q][m]);
      }
    }
  }
  // the epilogue: + b, f, each output stored once (z too where f' takes it)
  float bias[LAYER_TN];
  UNROLL for (int m = 0; m < LAYER_TN; ++m) bias[m] = tx + 16 * m < N ? b[tx + 16 * m] : 0.0f;
  UNROLL for (int q = 0; q < LAYER_TM; ++q) {
    const long long row = row0 + ty + 16 * q;
    if (row >= n) break;
    UNROLL for (int m = 0; m < LAYER_TN; ++m) {
      const int j = tx + 16 * m;
      if (j >= N) break;
      const float v = acc[q][m] + bias[m];
      if (keep_z) z[row * N + j] = v;
      a[row * N + j] = act_forward(kind, v, alpha);
    }
  }
}

extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 2)
    layer_forward_f32(const float* x, const float* W, const float* b, float* z, float* a, int n, int K, int N,
                      int keep_z, int kind, float alpha) {
  layer_forward<false>(x, nullptr, nullptr, W, b, z, a, n, K, N, keep_z, kind, alpha);
}

extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 2)
    layer_forward_rows_f32(const float* x, const long long* perm, const long long* start, const float* W,
                           const float* b, float* z, float* a, int n, int K, int N, int keep_z, int kind,
                           float alpha) {
  layer_forward<true>(x, perm, start, W, b, z, a, n, K, N, keep_z, kind, alpha);
}

// The same layer's backward pass, one kernel, for K, N <= LAYER_BW:
//   D' = D * f'(saved)                    (n, N)   (identity: D itself)
//   dW = x^T D',  db = 1^T D'             (K, N), (N,): this block's rows' part, its share
//   E = D' W^T                            (n, K)   where write_e (the gradient carried down)
//   E = (D' W^T) * g'(x)                           where e_kind is the layer below's activation g
//                                                  (x = its output, which its g' reads: relu,
//                                                  tanh, ...): the layer below's D', which then
//                                                  needs no read of its saved output (the same
//                                                  product as act_backward's, so the same bits)
// D' never leaves shared memory: D, saved and x are read once and E written once, where
// the separate ops (act_backward_bias_grad, then cuBLAS's x^T D' and D' W^T) also write D'
// and read it twice, and x^T D' reads x (narrow float32 on an H100: some 330 us a layer
// recorded for them; the kernel's traffic is about 86 us).
// Block b takes the row tiles b, b + G, b + 2 G, ... (G = gridDim.x: the launcher's
// min(tiles, LAYER_MAX_BLOCKS), set by n alone) and keeps its dW and db sums in registers
// over them: a thread dW[4 ty .. 4 ty + 3, 4 tx .. 4 tx + 3] (a 16-byte shared load of x's
// row and one of D''s a row of the tile, for 16 multiply-adds), threads t < LAYER_BW db[t].
// Each sum runs over the block's rows in order (a fused multiply-add a term from 0; db an
// add a row). The block's share, dW (K N values, row-major) then db (N), is written once,
// at the end, from shares + b share_stride (K N + N for the layer's own shares; a whole
// model's row where every layer's go into one (G, P) buffer); the launcher, or the step's
// guard, sums the shares in block order (common.cuh's sum_of_shares): the same bits on
// every run and GPU. E[r, i], rows ty + 16 q, columns
// tx + 16 m, sums over j in order, a 16-byte shared load of D''s row and one of W's row i
// serving four j.
// While a tile's sums run, the next tile's D, saved and x are on their way to registers.
#define LAYER_BR 32                                       // rows a backward tile
#define LAYER_BW 64                                       // K and N at most (padded to it with 0)
#define LAYER_LDB (LAYER_BW + 4)                          // the tile's and W's row stride
#define LAYER_B_LOADS (LAYER_BR * LAYER_BW / LAYER_THREADS)  // values a thread loads of D, saved, x: 8
#define LAYER_ER (LAYER_BR / 16)                          // rows of E a thread: 2
// WINDOWED (layer_backward_rows_f32, as layer_forward_rows_f32): x's row r is row
// perm[start[0] + r] of a whole split's x, its place loaded with the tile's values.
template <bool WINDOWED>
__device__ __forceinline__ void layer_backward(const float* D, const float* saved, const float* x,
                                               const long long* perm, const long long* start, const float* W,
                                               float* E, float* shares, long long share_stride, int n, int K, int N,
                                               int write_e, int kind, float alpha, int e_kind, float e_alpha) {
  __shared__ __align__(16) float ds[LAYER_BR * LAYER_LDB];  // D'[r, j] of the tile
  __shared__ __align__(16) float xs[LAYER_BR * LAYER_LDB];  // x[r, i] of the tile
  __shared__ __align__(16) float ws[LAYER_BW * LAYER_LDB];  // W[i, j], once per block
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  {  // W, every load before the stores (0 past K, N)
    float wv[LAYER_BW * LAYER_BW / LAYER_THREADS];
    UNROLL for (int u = 0; u < LAYER_BW * LAYER_BW / LAYER_THREADS; ++u) {
      const int e = t + u * LAYER_THREADS, i = e / LAYER_BW, j = e % LAYER_BW;
      wv[u] = i < K && j < N ? W[i * N + j] : 0.0f;
    }
    UNROLL for (int u = 0; u < LAYER_BW * LAYER_BW / LAYER_THREADS; ++u) {
      const int e = t + u * LAYER_THREADS;
      ws[e / LAYER_BW * LAYER_LDB + e % LAYER_BW] = wv[u];
    }
  }
  // thread t loads the tile's rows t / BW + u (THREADS / BW), column t % BW, of D, saved
  // and x (0 past n, N, K): a warp 32 consecutive columns of a row
  const int lr = t / LAYER_BW, lc = t % LAYER_BW;
  const long long first = WINDOWED ? start[0] : 0;  // the window's first place in perm
  float dv[LAYER_B_LOADS], sv[LAYER_B_LOADS], xv[LAYER_B_LOADS];
  auto load = [&](long long tile) {
    UNROLL for (int u = 0; u < LAYER_B_LOADS; ++u) {
      const long long row = tile * LAYER_BR + lr + u * (LAYER_THREADS / LAYER_BW);
      const bool in = row < n;
      dv[u] = in && lc < N ? D[row * N + lc] : 0.0f;
      sv[u] = in && lc < N && kind != ACT_IDENTITY ? saved[row * N + lc] : 0.0f;
      const long long xr = WINDOWED && in ? perm[first + row] : row;  // x's row
      xv[u] = in && lc < K ? x[xr * K + lc] : 0.0f;
    }
  };
  float gw[4][4], gb = 0.0f;
  UNROLL for (int u = 0; u < 4; ++u) UNROLL for (int m = 0; m < 4; ++m) gw[u][m] = 0.0f;
  const long long tiles = ((long long)n + LAYER_BR - 1) / LAYER_BR;
  if (blockIdx.x < tiles) load(blockIdx.x);
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();  // W staged; the previous tile's reads done
    UNROLL for (int u = 0; u < LAYER_B_LOADS; ++u) {
      const int at = (lr + u * (LAYER_THREADS / LAYER_BW)) * LAYER_LDB + lc;
      ds[at] = kind == ACT_IDENTITY ? dv[u] : dv[u] * act_grad(kind, sv[u], alpha);  // D' = D * f'
      xs[at] = xv[u];
    }
    __syncthreads();
    if (tile + gridDim.x < tiles) load(tile + gridDim.x);  // in flight during the sums below
    const int valid = (int)min((long long)LAYER_BR, (long long)n - tile * LAYER_BR);
    // dW[i, j] += x[r, i] D'[r, j], i = 4 ty + u, j = 4 tx + m, the tile's rows in order
    UNROLL_BY(4) for (int r = 0; r < valid; ++r) {
      const float4 xq = *(const float4*)(xs + r * LAYER_LDB + 4 * ty);
      const float4 dq = *(const float4*)(ds + r * LAYER_LDB + 4 * tx);
      UNROLL for (int u = 0; u < 4; ++u) UNROLL for (int m = 0; m < 4; ++m)
        gw[u][m] = fmaf(word_part(xq, u), word_part(dq, m), gw[u][m]);
    }
    if (t < LAYER_BW)  // db[t] += D'[r, t], the rows in order
      for (int r = 0; r < valid; ++r) gb += ds[r * LAYER_LDB + t];
    if (write_e) {  // E[r, i] = sum_j D'[r, j] W[i, j], r = ty + 16 q, i = tx + 16 m
      float acc[LAYER_ER][4];
      UNROLL for (int q = 0; q < LAYER_ER; ++q) UNROLL for (int m = 0; m < 4; ++m) acc[q][m] = 0.0f;
      UNROLL_BY(2) for (int j = 0; j < N; j += 4) {
        float4 dq[LAYER_ER], wq[4];
        UNROLL for (int q = 0; q < LAYER_ER; ++q) dq[q] = *(const float4*)(ds + (ty + 16 * q) * LAYER_LDB + j);
        UNROLL for (int m = 0; m < 4; ++m) wq[m] = *(const float4*)(ws + (tx + 16 * m) * LAYER_LDB + j);
        UNROLL for (int v = 0; v < 4; ++v) UNROLL for (int q = 0; q < LAYER_ER; ++q) UNROLL for (int m = 0; m < 4; ++m)
          acc[q][m] = fmaf(word_part(dq[q], v), word_part(wq[m], v), acc[q][m]);
      }
      UNROLL for (int q = 0; q < LAYER_ER; ++q) {
        const long long row = tile * LAYER_BR + ty + 16 * q;
        if (row >= n) break;
        UNROLL for (int m = 0; m < 4; ++m) {
          const int i = tx + 16 * m;
          if (i < K)  // (x[r, i] is the layer below's output: its g' takes it)
            E[row * K + i] = e_kind == ACT_IDENTITY
                                 ? acc[q][m]
                                 : acc[q][m] * act_grad(e_kind, xs[(ty + 16 * q) * LAYER_LDB + i], e_alpha);
        }
      }
    }
  }
  // the block's share: dW (K x N, row-major), then db (N)
  float* share = shares + (long long)blockIdx.x * share_stride;
  UNROLL for (int u = 0; u < 4; ++u) UNROLL for (int m = 0; m < 4; ++m)
    if (4 * ty + u < K && 4 * tx + m < N) share[(4 * ty + u) * N + 4 * tx + m] = gw[u][m];
  if (t < N) share[K * N + t] = gb;
}

extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 2)
    layer_backward_f32(const float* D, const float* saved, const float* x, const float* W, float* E, float* shares,
                       long long share_stride, int n, int K, int N, int write_e, int kind, float alpha, int e_kind,
                       float e_alpha) {
  layer_backward<false>(D, saved, x, nullptr, nullptr, W, E, shares, share_stride, n, K, N, write_e, kind, alpha,
                        e_kind, e_alpha);
}

extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 2)
    layer_backward_rows_f32(const float* D, const float* saved, const float* x, const long long* perm,
                            const long long* start, const float* W, float* E, float* shares, long long share_stride,
                            int n, int K, int N, int write_e, int kind, float alpha, int e_kind, float e_alpha) {
  layer_backward<true>(D, saved, x, perm, start, W, E, shares, share_stride, n, K, N, write_e, kind, alpha, e_kind,
                       e_alpha);
}
