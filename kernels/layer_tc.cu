// layer_tc.cu: layer.cu's two kernels for bfloat16 storage, their products on the tensor
// cores (mma.sync m16n8k16: bf16 inputs, float32 sums; sm_80 and later):
//   forward   z = x W + b,  a = f(z)                                x, W, a, z bf16; b float32
//   backward  D' = D f'(saved);  dW = x^T D',  db = 1^T D';  E = D' W^T (* g'(x))
// For narrow bf16 layers (K and N of tens, many rows) cuBLASLt's fused products ran at 2.5
// to 6 times their traffic (narrow bf16 on an H100: 56 us a forward product of 262144 x 64
// x 64 with its bias and ReLU, 132 us a backward one with DRELU_BGRAD, where a read and a
// write of a (262144, 64) bf16 matrix take about 22; docs/benchmarks.md). As in layer.cu,
// x is read once and a (and z) written once forward; D, saved and x read once and E written
// once backward, D' never leaving shared memory. The products are a few mma instructions a
// tile; the kernels are the HBM's, not the multipliers'.
//
// Rounding, as cuBLASLt's bf16 epilogues (numpy_ops.gemm_bias_act, layer_backward, 16-bit
// storage): forward v = (the float32 sum of x W) + b, z = bf16(v), a = bf16(f(v));
// backward D' = D f'(saved) in float32, rounded once to bf16 (the products' input; the
// identity's D' is D), db = the float32 sum of those rounded values, dW = x^T D' summed in
// float32, E = bf16((D' W^T) g'(x)), g'(x) taken in float32. Each sum's order is the tensor
// cores' own; the grid is set by the rows alone and every block's share is summed in block
// order, so the bits are the same on every run of a given GPU.
//
// WINDOWED (layer_forward_rows_bf16, layer_backward_rows_bf16: a network's first layer in
// the training step, as layer.cu's _rows_f32): x's row r is row perm[start[0] + r] of a
// whole split's float32 x, rounded to bf16 as it is loaded: the bits of the batch gathered,
// then rounded by cast.cu (no gather and no cast first).
#include "common.cuh"
#include "activations.cuh"
#include "precision.cuh"

#define TC_THREADS 256     // threads per block (the launcher's: layer.cu's LAYER_THREADS)
#define TC_W 64            // K and N at most
#define TC_LD 72           // a shared tile's row stride in bf16 values: 36 words, so that a
                           // fragment's 8 rows x 4 words fall in 32 different banks
#define TC_FWD_ROWS 128    // rows a forward block: 8 warps x 16 (layer.cu's LAYER_BM)
#define TC_BACK_ROWS 32    // rows a backward tile (layer.cu's LAYER_BR: the same shares)
#define TC_BACK_LOADS (TC_BACK_ROWS * TC_W / TC_THREADS)  // values a thread loads of D, saved, x: 8

// Two bf16 of a shared tile as one 32-bit word (p 4-byte aligned), the first in the low half
__device__ __forceinline__ unsigned int pair_at(const bf16_t* p) {
#ifdef __CUDACC_RTC__
  return *(const unsigned int*)p;
#else
  unsigned int w;
  __builtin_memcpy(&w, p, 4);
  return w;
#endif
}

// x's value as the products' input: a bf16 x as it is, a float32 one (a window of the
// split) rounded to nearest even, as cast.cu rounds it
__device__ __forceinline__ bf16_t as_bf16(bf16_t v) { return v; }
__device__ __forceinline__ bf16_t as_bf16(float v) { return bf16_from_float(v); }

// One warp's C (16 x 8) += A (16 x 16) B (16 x 8), bf16 inputs, float32 sums. Lane
// l = 4 g + q holds (two bf16 a word, the lower column or k in the low half)
//   a[0] = A[g, 2q .. 2q+1]    a[1] = A[g+8, 2q .. 2q+1]
//   a[2] = A[g, 2q+8 .. 2q+9]  a[3] = A[g+8, 2q+8 .. 2q+9]
//   b[0] = B[2q .. 2q+1, g]    b[1] = B[2q+8 .. 2q+9, g]
//   c[0], c[1] = C[g, 2q], C[g, 2q+1]    c[2], c[3] = C[g+8, 2q], C[g+8, 2q+1]
// (the PTX ISA's fragments of mma.m16n8k16 with .bf16). Every lane of the warp takes part.
// On the host (tests/cuda_host.h) the warp's fragments go to every lane and each
// output adds its 16 products in k order, one fused multiply-add each (a bf16 product is
// exact in float32): an order of the sum, not the tensor cores' (whose order the tests'
// bounds leave open).
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned int* a, const unsigned int* b) {
#ifdef __CUDACC_RTC__
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  unsigned int mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]}, all[32 * 6];
  warp_all_words(mine, 6, all);  // every lane's fragments (tests/cuda_host.h)
  // A's rows g, g + 8 and B's columns 2q, 2q + 1 at k = 0..15: lane 4 r + s holds A's row r
  // (and B's column r) at k = 2s, 2s+1 (words 0 and 1 of A, 0 of B) and 2s+8, 2s+9 (2, 3; 1)
  auto half = [](unsigned int w, int h) { return to_float(bf16_t{(unsigned short)(w >> (16 * h))}); };
  float arow[2][16], bcol[2][16];
  for (int s = 0; s < 4; ++s)
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 2; ++r) {
        const unsigned int* fa = all + 6 * (4 * g + s);
        const unsigned int* fb = all + 6 * (4 * (2 * q + r) + s) + 4;
        arow[r][2 * s + h] = half(fa[r], h);
        arow[r][2 * s + 8 + h] = half(fa[r + 2], h);
        bcol[r][2 * s + h] = half(fb[0], h);
        bcol[r][2 * s + 8 + h] = half(fb[1], h);
      }
  for (int r = 0; r < 2; ++r)
    for (int m = 0; m < 2; ++m)
      for (int k = 0; k < 16; ++k) c[2 * r + m] = std::fma(arow[r][k], bcol[m][k], c[2 * r + m]);
#endif
}

// The fragments of A (16 x 16) at p, row-major with row stride TC_LD (p: A[0, 0]; a row's
// k pairs are words), and of B (16 x 8) whose column j's 16 k are at p + j TC_LD (B^T
// row-major, as A's rows)
__device__ __forceinline__ void a_fragment(unsigned int* a, const bf16_t* p, int g, int q) {
  const bf16_t* at = p + g * TC_LD + 2 * q;
  a[0] = pair_at(at);
  a[1] = pair_at(at + 8 * TC_LD);
  a[2] = pair_at(at + 8);
  a[3] = pair_at(at + 8 * TC_LD + 8);
}
__device__ __forceinline__ void b_fragment(unsigned int* b, const bf16_t* p, int g, int q) {
  const bf16_t* at = p + g * TC_LD + 2 * q;
  b[0] = pair_at(at);
  b[1] = pair_at(at + 8);
}

// dst[i] = src[i] for i < count, the block's threads U values a pass, each pass's loads
// before its stores (a store may alias a later load as far as the compiler knows)
#define TC_COPY_UNROLL 8

// x: (n, K), W: (K, N) bf16 row-major, b: (N,) float32; a: (n, N) = bf16(f(x W + b)); z: (n,
// N) = bf16(x W + b) where keep_z (f' takes z), else not written. a and z must not overlap
// x or W. K, N <= TC_W. Grid: ceil(n / TC_FWD_ROWS) blocks of TC_THREADS threads; warp w
// takes the block's rows 16 w .. 16 w + 15, all N columns (N / 8 mma tiles, K / 16 steps).
// TX: bf16_t, or float for WINDOWED (x a whole split's, row r of the batch its row
// perm[start[0] + r]; the block's rows' places read once, into shared memory).
template <bool WINDOWED, typename TX>
__device__ __forceinline__ void layer_forward_tc(const TX* x, const long long* perm, const long long* start,
                                                 const bf16_t* W, const float* b, bf16_t* z, bf16_t* a, int n, int K,
                                                 int N, int keep_z, int kind, float alpha) {
  __shared__ __align__(16) bf16_t xs[TC_FWD_ROWS * TC_LD];  // x[row0 + r, k] at r LD + k; then a's rows
  __shared__ __align__(16) bf16_t wt[TC_W * TC_LD];         // W[k, j] at j LD + k (W^T: B's columns)
  __shared__ __align__(16) bf16_t zs[TC_FWD_ROWS * TC_LD];  // z's rows (keep_z)
  __shared__ long long places[WINDOWED ? TC_FWD_ROWS : 1];  // WINDOWED: x's row of row0 + r (-1: past n)
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, q = lane % 4;
  const long long row0 = (long long)blockIdx.x * TC_FWD_ROWS;
  const int kp = (K + 15) / 16 * 16, np = (N + 7) / 8 * 8;  // K and N padded with 0 to whole mma tiles
  const bf16_t zero = {0};
  if (WINDOWED) {
    if (t < TC_FWD_ROWS) places[t] = row0 + t < n ? perm[start[0] + row0 + t] : -1LL;
    __syncthreads();
  }
  // the stage: x's rows (0 past n and K) and W^T (0 past K and N), each pass's loads first
  for (int e0 = t; e0 < TC_FWD_ROWS * kp; e0 += TC_COPY_UNROLL * TC_THREADS) {
    bf16_t v[TC_COPY_UNROLL];
    UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) {
      const int e = e0 + u * TC_THREADS, r = e / kp, k = e % kp;
      const bool in = e < TC_FWD_ROWS * kp && k < K;
      if (WINDOWED) {
        const long long p = in ? places[r] : -1LL;
        v[u] = p >= 0 ? as_bf16(x[p * K + k]) : zero;
      } else {
        v[u] = in && row0 + r < n ? as_bf16(x[(row0 + r) * K + k]) : zero;
      }
    }
    UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) {
      const int e = e0 + u * TC_THREADS;
      if (e < TC_FWD_ROWS * kp) xs[e / kp * TC_LD + e % kp] = v[u];
    }
  }
  for (int e0 = t; e0 < kp * np; e0 += TC_COPY_UNROLL * TC_THREADS) {
    bf16_t v[TC_COPY_UNROLL];
    UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) {
      const int e = e0 + u * TC_THREADS, k = e / np, j = e % np;  // (a warp: a W row's consecutive j)
      v[u] = e < kp * np && k < K && j < N ? W[k * N + j] : zero;
    }
    UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) {
      const int e = e0 + u * TC_THREADS;
      if (e < kp * np) wt[e % np * TC_LD + e / np] = v[u];
    }
  }
  __syncthreads();
  // c[m] = the warp's rows x columns 8 m .. 8 m + 7: sum over k of x[r, k] W[k, j]
  float c[TC_W / 8][4];
  UNROLL for (int m = 0; m < TC_W / 8; ++m) UNROLL for (int u = 0; u < 4; ++u) c[m][u] = 0.0f;
  const bf16_t* xw = xs + 16 * warp * TC_LD;
  for (int k0 = 0; k0 < kp; k0 += 16) {
    unsigned int af[4];
    a_fragment(af, xw + k0, g, q);
    UNROLL for (int m = 0; m < TC_W / 8; ++m) {
      if (8 * m >= np) break;  // (the same for the whole warp)
      unsigned int bf[2];
      b_fragment(bf, wt + 8 * m * TC_LD + k0, g, q);
      mma_bf16_16816(c[m], af, bf);
    }
  }
  // the epilogue: v = c + b[j], into the warp's own rows of xs (a) and zs (z), which only
  // this warp read (its lanes all past their last mma); then every row out, coalesced
  UNROLL for (int m = 0; m < TC_W / 8; ++m) {
    if (8 * m >= np) break;
    UNROLL for (int u = 0; u < 4; ++u) {
      const int r = 16 * warp + g + 8 * (u / 2), j = 8 * m + 2 * q + u % 2;
      const float v = c[m][u] + (j < N ? b[j] : 0.0f);
      xs[r * TC_LD + j] = bf16_from_float(act_forward(kind, v, alpha));
      if (keep_z) zs[r * TC_LD + j] = bf16_from_float(v);
    }
  }
  __syncthreads();
  const int rows = (int)min((long long)TC_FWD_ROWS, (long long)n - row0);
  for (int e = t; e < rows * N; e += TC_THREADS) {
    const int r = e / N, j = e % N;
    a[(row0 + r) * N + j] = xs[r * TC_LD + j];
    if (keep_z) z[(row0 + r) * N + j] = zs[r * TC_LD + j];
  }
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    layer_forward_bf16(const bf16_t* x, const bf16_t* W, const float* b, bf16_t* z, bf16_t* a, int n, int K, int N,
                       int keep_z, int kind, float alpha) {
  layer_forward_tc<false>(x, nullptr, nullptr, W, b, z, a, n, K, N, keep_z, kind, alpha);
}

// x: a whole split's float32 (P, K); row r of the batch is its row perm[start[0] + r]
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    layer_forward_rows_bf16(const float* x, const long long* perm, const long long* start, const bf16_t* W,
                            const float* b, bf16_t* z, bf16_t* a, int n, int K, int N, int keep_z, int kind,
                            float alpha) {
  layer_forward_tc<true>(x, perm, start, W, b, z, a, n, K, N, keep_z, kind, alpha);
}

// D, saved: (n, N), x: (n, K), W: (K, N) bf16 row-major; E: (n, K) bf16 where write_e;
// shares: (gridDim.x, share_stride) float32, block b's dW (K N, row-major) then db (N) from
// shares + b share_stride. kind: f (saved: z or a, as its f' reads; identity: D' = D);
// e_kind: the layer below's g, whose g' reads x (its output), or identity (E = D' W^T).
// K, N <= TC_W. E must not overlap D, saved, x or W. Block b takes the row tiles b, b + G,
// ... (G = gridDim.x: layer.cu's rule, set by n alone) and keeps its dW in registers over
// them: warp w the mma tiles of rows 16 (w / 2) .. of dW and columns 8 (4 (w % 2) + v) ..
// (v < 4), and of E rows 16 (w / 4) .. and columns 8 (2 (w % 4) + v) .. (v < 2); threads
// t < N db[t], a tile's rows in order. While a tile's products run, the next tile's D,
// saved and x are on their way to registers.
// TX, WINDOWED: as layer_forward_tc's (x's row of the tile's row loaded with its values).
template <bool WINDOWED, typename TX>
__device__ __forceinline__ void layer_backward_tc(const bf16_t* D, const bf16_t* saved, const TX* x,
                                                  const long long* perm, const long long* start, const bf16_t* W,
                                                  bf16_t* E, float* shares, long long share_stride, int n, int K,
                                                  int N, int write_e, int kind, float alpha, int e_kind,
                                                  float e_alpha) {
  __shared__ __align__(16) bf16_t ws[TC_W * TC_LD];          // W[i, j] at i LD + j (E's B: W's rows)
  __shared__ __align__(16) bf16_t ds[TC_BACK_ROWS * TC_LD];  // D'[r, j] at r LD + j (E's A)
  __shared__ __align__(16) bf16_t dt[TC_W * TC_LD];          // D'[r, j] at j LD + r (dW's B: D''s columns)
  __shared__ __align__(16) bf16_t xt[TC_W * TC_LD];          // x[r, i] at i LD + r (dW's A: x^T)
  __shared__ __align__(16) bf16_t es[TC_BACK_ROWS * TC_LD];  // E's rows, on their way out
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, q = lane % 4;
  const bf16_t zero = {0};
  {  // every stage 0 (the padding past K, N and the tile's rows stays so), then W
    for (int e = t; e < TC_W * TC_LD; e += TC_THREADS) ws[e] = dt[e] = xt[e] = zero;
    for (int e = t; e < TC_BACK_ROWS * TC_LD; e += TC_THREADS) ds[e] = es[e] = zero;
    __syncthreads();
    for (int e0 = t; e0 < K * N; e0 += TC_COPY_UNROLL * TC_THREADS) {
      bf16_t v[TC_COPY_UNROLL];
      UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) v[u] = e0 + u * TC_THREADS < K * N ? W[e0 + u * TC_THREADS] : zero;
      UNROLL for (int u = 0; u < TC_COPY_UNROLL; ++u) {
        const int e = e0 + u * TC_THREADS;
        if (e < K * N) ws[e / N * TC_LD + e % N] = v[u];
      }
    }
  }
  const int kp = (K + 15) / 16 * 16, np = (N + 7) / 8 * 8, n16 = (N + 15) / 16 * 16, k8 = (K + 7) / 8 * 8;
  // thread t loads the tile's rows lr + 4 u, column lc, of D, saved and x (0 past n, N, K):
  // a warp 32 consecutive columns of a row
  const int lr = t / TC_W, lc = t % TC_W;
  const long long first = WINDOWED ? start[0] : 0;  // the window's first place in perm
  bf16_t dv[TC_BACK_LOADS], sv[TC_BACK_LOADS], xv[TC_BACK_LOADS];
  auto load = [&](long long tile) {
    UNROLL for (int u = 0; u < TC_BACK_LOADS; ++u) {
      const long long row = tile * TC_BACK_ROWS + lr + u * (TC_THREADS / TC_W);
      const bool in = row < n;
      dv[u] = in && lc < N ? D[row * N + lc] : zero;
      sv[u] = in && lc < N && kind != ACT_IDENTITY ? saved[row * N + lc] : zero;
      const long long xr = WINDOWED && in && lc < K ? perm[first + row] : row;  // x's row
      xv[u] = in && lc < K ? as_bf16(x[xr * K + lc]) : zero;
    }
  };
  float gw[4][4], gb = 0.0f;  // dW's tiles (v, fragment) and db[t]
  UNROLL for (int v = 0; v < 4; ++v) UNROLL for (int u = 0; u < 4; ++u) gw[v][u] = 0.0f;
  const int mw = warp / 2, nw = 4 * (warp % 2);  // this warp's dW tiles: rows 16 mw, columns 8 (nw + v)
  const int me = warp / 4, ne = 2 * (warp % 4);  // and E's: rows 16 me, columns 8 (ne + v)
  const long long tiles = ((long long)n + TC_BACK_ROWS - 1) / TC_BACK_ROWS;
  if (blockIdx.x < tiles) load(blockIdx.x);
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    __syncthreads();  // W staged; the previous tile's reads (and E's way out) done
    UNROLL for (int u = 0; u < TC_BACK_LOADS; ++u) {
      const int r = lr + u * (TC_THREADS / TC_W);
      if (lc < N) {  // D' = D f'(saved), rounded once (identity: D as it is)
        const bf16_t d = kind == ACT_IDENTITY ? dv[u]
                                              : bf16_from_float(to_float(dv[u]) * act_grad(kind, to_float(sv[u]), alpha));
        ds[r * TC_LD + lc] = d;
        dt[lc * TC_LD + r] = d;
      }
      if (lc < K) xt[lc * TC_LD + r] = xv[u];
    }
    __syncthreads();
    if (tile + gridDim.x < tiles) load(tile + gridDim.x);  // in flight during the products below
    const int valid = (int)min((long long)TC_BACK_ROWS, (long long)n - tile * TC_BACK_ROWS);
    // dW[i, j] += sum_r x[r, i] D'[r, j]: A = x^T (xt's rows i), B = D' (dt's rows j), k = the tile's rows
    if (16 * mw < kp) {
      UNROLL for (int r0 = 0; r0 < TC_BACK_ROWS; r0 += 16) {
        unsigned int af[4];
        a_fragment(af, xt + 16 * mw * TC_LD + r0, g, q);
        UNROLL for (int v = 0; v < 4; ++v) {
          if (8 * (nw + v) >= np) break;
          unsigned int bf[2];
          b_fragment(bf, dt + 8 * (nw + v) * TC_LD + r0, g, q);
          mma_bf16_16816(gw[v], af, bf);
        }
      }
    }
    if (t < N)  // db[t] += D'[r, t], the rows in order
      for (int r = 0; r < valid; ++r) gb += to_float(ds[r * TC_LD + t]);
    if (write_e) {  // E[r, i] = sum_j D'[r, j] W[i, j]: A = D' (ds), B = W^T (ws's rows i), k = j
      float c[2][4];
      UNROLL for (int v = 0; v < 2; ++v) UNROLL for (int u = 0; u < 4; ++u) c[v][u] = 0.0f;
      for (int j0 = 0; j0 < n16; j0 += 16) {
        unsigned int af[4];
        a_fragment(af, ds + 16 * me * TC_LD + j0, g, q);
        UNROLL for (int v = 0; v < 2; ++v) {
          if (8 * (ne + v) >= k8) break;
          unsigned int bf[2];
          b_fragment(bf, ws + 8 * (ne + v) * TC_LD + j0, g, q);
          mma_bf16_16816(c[v], af, bf);
        }
      }
      UNROLL for (int v = 0; v < 2; ++v) {
        if (8 * (ne + v) >= k8) break;
        UNROLL for (int u = 0; u < 4; ++u) {
          const int r = 16 * me + g + 8 * (u / 2), i = 8 * (ne + v) + 2 * q + u % 2;
          // (x[r, i] is the layer below's output: its g' takes it)
          const float e = e_kind == ACT_IDENTITY ? c[v][u] : c[v][u] * act_grad(e_kind, to_float(xt[i * TC_LD + r]), e_alpha);
          es[r * TC_LD + i] = bf16_from_float(e);
        }
      }
      __syncthreads();
      for (int e = t; e < valid * K; e += TC_THREADS) {
        const int r = e / K, i = e % K;
        E[(tile * TC_BACK_ROWS + r) * K + i] = es[r * TC_LD + i];
      }
    }
  }
  // the block's share: dW (K x N, row-major), then db (N)
  float* share = shares + (long long)blockIdx.x * share_stride;
  UNROLL for (int v = 0; v < 4; ++v) UNROLL for (int u = 0; u < 4; ++u) {
    const int i = 16 * mw + g + 8 * (u / 2), j = 8 * (nw + v) + 2 * q + u % 2;
    if (i < K && j < N) share[i * N + j] = gw[v][u];
  }
  if (t < N) share[K * N + t] = gb;
}

extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    layer_backward_bf16(const bf16_t* D, const bf16_t* saved, const bf16_t* x, const bf16_t* W, bf16_t* E,
                        float* shares, long long share_stride, int n, int K, int N, int write_e, int kind,
                        float alpha, int e_kind, float e_alpha) {
  layer_backward_tc<false>(D, saved, x, nullptr, nullptr, W, E, shares, share_stride, n, K, N, write_e, kind, alpha,
                           e_kind, e_alpha);
}

// x: a whole split's float32 (P, K); row r of the batch is its row perm[start[0] + r]
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    layer_backward_rows_bf16(const bf16_t* D, const bf16_t* saved, const float* x, const long long* perm,
                             const long long* start, const bf16_t* W, bf16_t* E, float* shares,
                             long long share_stride, int n, int K, int N, int write_e, int kind, float alpha,
                             int e_kind, float e_alpha) {
  layer_backward_tc<true>(D, saved, x, perm, start, W, E, shares, share_stride, n, K, N, write_e, kind, alpha, e_kind,
                          e_alpha);
}
