// mlp.cu: a small MLP's whole forward pass, loss and backward pass in one kernel ("fully
// fused", as tiny-cuda-nn's MLPs): each block takes tiles of R batch rows and keeps their
// activations and gradients in shared memory, so that only the batch and the weights are
// read from global memory and only the block's gradient share and its loss are written.
// For a step that is a chain of small kernels (narrow layers, small batches), this is one
// launch in place of the layers' products, activations, bias sums and the loss.
//
// The network (model.py): L layers, widths n_0..n_L, W_k (n_k, n_{k+1}) row-major then b_k
// in the flat buffer `params` (P values), f_k = act kind k (activations.cuh). Per tile:
//   forward   A_0 = x rows;  z_k = A_k W_k + b_k;  A_{k+1} = f_k(z_k)           k = 0..L-1
//   loss      l_r, D = dl/dA_L grad_scale   (loss.cuh, a warp per row; rows past n: D = 0)
//   backward  D' = D * f_k'(saved_k);  dW_k += A_k^T D';  db_k += sum_r D';  D = D' W_k^T
// saved_k is z_k where f_k' takes the pre-activation (dims' saves_z), else A_{k+1}.
// Parameter gradients are accumulated (+=) over the block's tiles into its share
// shares[blockIdx.x] (P values; the first tile writes); the gradient is the sum of the
// shares over blocks, in block order (common.cuh's sum_of_shares: sum_shares below, or the
// guard's norm kernel, optim.cu). With one block the share is the gradient itself.
// The batch mean of the loss comes from the same launch: each warp sums its rows' losses
// in row order, the block its warps' sums into loss_partial[blockIdx.x], and the block that
// finishes last (common.cuh's last_block) sums the partials / divisor into loss_out[0].
// Tiles go to blocks by a grid stride: with the grid and R fixed by n and the model (the
// launcher's rule), every sum has a fixed order and the results the same bits each run.
#include "loss.cuh"

#define MLP_THREADS 256          // threads per block (the launcher's)
#define MLP_MAX_LAYERS 8
#define MLP_MAX_ROWS 64          // rows per tile at most (the launcher's; the tile's row table)

// The block's shared memory is dynamic (the launcher's size, up to the budgets of
// cupy_backend.MLP_SHARED_BYTES for the tile and MLP_WEIGHT_BYTES for the weights, more than
// the 48 KiB a kernel may hold statically): on the GPU an extern __shared__ array; in the
// host build (tests/cuda_host.h, one block at a time) the host's buffer
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
extern __shared__ __align__(16) unsigned char mlp_dynamic_shared[];
#define MLP_DYNAMIC_SHARED mlp_dynamic_shared
#else
#define MLP_DYNAMIC_SHARED host_dynamic_shared
#endif

// The batch's row b in x, labels, targets: perm[first + b] (windowed: the rows of a resident
// split in the epoch's order, read where they lie, with no gather before; first = start[0],
// read once by the kernel), else b.
__device__ __forceinline__ long long batch_row(const long long* perm, long long first, long long b) {
  return perm != nullptr ? perm[first + b] : b;
}

// Register tiles. A product's outputs go to the block's threads as items of rt rows by c
// columns, the c columns `n / c` apart (so that a warp's lanes read consecutive words of a
// shared row: no bank conflicts), and each item's rt x c sums are kept in registers, one
// shared read of a weight serving rt rows and one of an activation c columns. c: the widest
// of ct_max, ct_max / 2, ..., 1 that divides the n columns and still gives each of the
// `threads` threads an item (`groups` row groups x n / c items), else 1 (the most items).
// Each output's sum runs over the same terms in the same order whatever c is: c changes
// the speed, not the bits.
__device__ __forceinline__ int tile_cols(int groups, int n, int threads, int ct_max) {
  for (int c = ct_max; c > 1; c /= 2)
    if (n % c == 0 && groups * (n / c) >= threads) return c;
  return 1;
}

// dims (3 L + 1 ints): widths n_0..n_L, then each layer's activation kind, then 1 where f_k'
// takes z_k (saved apart), else 0.
// x: (n, n_0); labels: (n,) (cross-entropy) or targets: (n, n_L); shares: (gridDim.x, p).
// windowed (perm not null): x, labels, targets are a whole split, and the batch's n rows
// are perm[start[0] .. start[0] + n) (the step's gather_windows, folded in).
// rt (1, 2 or 4, dividing rows): rows a thread takes in the forward products and in
// D' W^T; ct_max (1, 2 or 4): columns a thread takes at most (tile_cols), in those and in
// the weight gradient's A^T D' (there: rows i and columns j). Each element's sum has the
// same order whatever rt and ct_max are (over i, then + b; over the tile's rows), so they
// change the speed, not the bits.
// resident: 1 where wtile_size holds every layer's W (sum of n_k (n_{k+1} + 1) values, the
// launcher's choice where this GPU's shared memory takes it beside the tile): each W is
// staged once per block, before the tiles, and never again (0: once per tile and product,
// into one stage). The same sums in the same order either way: the speed, not the bits.
// Shared memory (dynamic, rows x per-row values then wtile_size values): R x width each:
// A_0..A_L, then z_k for each layer that saves it, then D and E (R x max width): the
// gradient carried down and the next one (E first holds the tile's targets, for the loss).
// Then wtile: rows i0 .. i1 - 1 of W_k (row stride n_{k+1} + 1: the backward product's
// threads read one column of different rows, which the padding puts in different banks).
// A forward element's sum over i runs across the chunks in order (its partial sum kept in
// its output's place in between), so the chunks change the speed, not the bits. The
// tile's row table (its rows' places in x and their labels) is static shared memory,
// beside the loss's sums.
// dst[to(e)] = *at(e) (0 where at(e) is null) for e < count, the block's threads taking
// U values a pass: the U addresses, then the U loads, then the stores. One at a time, each
// global load waited for the previous value's store (dst may alias the source as far as the
// compiler knows), a latency each, and the whole block waits at the barrier after.
template <int U, typename T, typename At, typename To>
__device__ __forceinline__ void block_gather(At at, T* dst, To to, int count) {
  const int nt = blockDim.x;
  for (int e0 = threadIdx.x; e0 < count; e0 += U * nt) {
    const T* f[U];
    UNROLL for (int u = 0; u < U; ++u) f[u] = e0 + u * nt < count ? at(e0 + u * nt) : nullptr;
    T v[U];
    UNROLL for (int u = 0; u < U; ++u) v[u] = f[u] != nullptr ? *f[u] : T(0);
    UNROLL for (int u = 0; u < U; ++u) if (e0 + u * nt < count) dst[to(e0 + u * nt)] = v[u];
  }
}

// wtile[(i - i0) ld + j] = W[i, j] for i0 <= i < i1 (W: (., no) row-major), every thread
// loading (block_gather, MLP_STAGE_UNROLL values a pass), after the block is done with
// what wtile held before (the barrier before) and before anyone reads it (the one after).
// 8: a 64 x 64 float32 W in two rounds of loads, tiny's 64 x 128 in four.
#define MLP_STAGE_UNROLL 8
template <typename T>
__device__ __forceinline__ void stage_rows(const T* W, int no, int i0, int i1, T* wtile, int ld) {
  __syncthreads();
  const T* from = W + (long long)i0 * no;
  block_gather<MLP_STAGE_UNROLL>([=](int e) { return from + e; }, wtile, [=](int e) { return e / no * ld + e % no; },
                                 (i1 - i0) * no);
  __syncthreads();
}

// A 16-byte word of T (a 16-byte load, LDG.128): 4 float or 2 double (common.cuh's
// word_part reads value c of it)
template <typename T> struct Word16;
template <> struct Word16<float> {
  typedef float4 type;
  static constexpr int n = 4;
};
template <> struct Word16<double> {
  typedef double2 type;
  static constexpr int n = 2;
};

// Every layer's W into its resident stage (row stride n_{k+1} + 1), once, before the
// tiles: the layers' loads one after another with no barrier between them (one after all),
// and a layer whose W starts on a 16-byte boundary with a whole number of 16-byte words
// loads a word where it loaded a value (4 float32, 2 float64), MLP_STAGE_UNROLL words a
// pass. With stage_rows a layer took a barrier pair and a round of loads per 8 values a
// thread: tiny (64 x 128 and 128 x 10) 5 rounds and 4 barriers, now 2 and 1; narrow (five
// 64 x 64) 10 and 10, now 5 and 1. A copy: the same bits. (The pass's 8 words raise the
// kernel's registers from 94 to 117, float32: still two blocks of 256 threads an SM.)
template <typename T>
__device__ __forceinline__ void stage_resident(const T* params, const int* width, int L, T* wtile,
                                               const int* stage_at) {
  typedef Word16<T> W16;
  const int t = threadIdx.x, nt = blockDim.x;
  for (int k = 0, w_at = 0; k < L; w_at += width[k] * width[k + 1] + width[k + 1], ++k) {
    const int no = width[k + 1], count = width[k] * no, ld = no + 1, words = count / W16::n;
    const T* from = params + w_at;
    T* const to = wtile + stage_at[k];
    if (count % W16::n == 0 && ((unsigned long long)from) % 16 == 0) {
      const typename W16::type* word = (const typename W16::type*)from;
      for (int q0 = t; q0 < words; q0 += MLP_STAGE_UNROLL * nt) {
        typename W16::type w[MLP_STAGE_UNROLL];  // the pass's loads first
        UNROLL for (int u = 0; u < MLP_STAGE_UNROLL; ++u) if (q0 + u * nt < words) w[u] = word[q0 + u * nt];
        UNROLL for (int u = 0; u < MLP_STAGE_UNROLL; ++u) {
          if (q0 + u * nt >= words) break;
          UNROLL for (int c = 0; c < W16::n; ++c) {
            const int e = (q0 + u * nt) * W16::n + c;
            to[e / no * ld + e % no] = word_part(w[u], c);
          }
        }
      }
    } else {
      block_gather<MLP_STAGE_UNROLL>([=](int e) { return from + e; }, to, [=](int e) { return e / no * ld + e % no; },
                                     count);
    }
  }
  __syncthreads();
}

// The products' items, one function each, with its register tile's rows and columns as
// template parameters (RT, CT in 1, 2, 4; MLP_TILE_CALL picks the instance at run time):
// with them known, the loops carry no predicate per row and column and read shared
// memory at fixed offsets. Over runtime bounds (up to 4 x 4, each term predicated) the
// forward product's inner loop took 71 instructions per 16 multiply-adds, 90 with its
// operands loaded first; this one about 240 per 128, unrolled four times (docs/benchmarks.md).

// Forward: z[r0 + q, j0 + m cols] = (the partial sum)
//                                   + sum_{i0 <= i < i1} A_k[r0 + q, i] W[i, j0 + m cols]
// (+ b[j] in W's last chunk, i1 = ni), into partial (z_k's place, or A_{k+1}'s until the
// activation pass); item e: rows r0 = e / cols * RT .. + RT - 1, columns j0 = e % cols + m cols.
template <typename T, int RT, int CT>
__device__ __forceinline__ void forward_items(const T* a_k, const T* wtile, const T* b, T* partial, int ni, int no,
                                              int ld, int i0, int i1, int items, int cols) {
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int r0 = e / cols * RT, j0 = e % cols;
    const T* a = a_k + r0 * ni;
    T z[RT][CT], bias[CT];  // bias: b[j] of the item's columns, loaded during the sums
    UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m)
      z[q][m] = i0 > 0 ? partial[(r0 + q) * no + j0 + m * cols] : T(0);
    UNROLL for (int m = 0; m < CT; ++m) bias[m] = i1 == ni ? b[j0 + m * cols] : T(0);
    const T* wrow = wtile + j0;  // row i - i0 of the stage, at the item's first column
    for (int i = i0; i < i1; ++i, wrow += ld) {
      T w[CT], av[RT];  // each weight read once for the RT rows, each activation once for the CT columns
      UNROLL for (int m = 0; m < CT; ++m) w[m] = wrow[m * cols];
      UNROLL for (int q = 0; q < RT; ++q) av[q] = a[q * ni + i];
      UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m) z[q][m] += av[q] * w[m];
    }
    UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m)
      partial[(r0 + q) * no + j0 + m * cols] = i1 < ni ? z[q][m] : z[q][m] + bias[m];
  }
}

// Backward: E[r0 + q, i0 + h0 + m cols] = sum_j D'[r0 + q, j] W[i0 + h0 + m cols, j] (W's
// rows i0.. staged); item e: rows r0 = e / cols * RT .., columns h0 = e % cols + m cols.
template <typename T, int RT, int CT>
__device__ __forceinline__ void input_grad_items(const T* D, const T* wtile, T* E, int ni, int no, int ld, int i0,
                                                 int items, int cols) {
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int r0 = e / cols * RT, h0 = e % cols;
    const T* d = D + r0 * no;
    const T* wcol = wtile + h0 * ld;  // the stage's row h0 (W's row i0 + h0)
    T s[RT][CT];
    UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m) s[q][m] = T(0);
    for (int j = 0; j < no; ++j) {
      T w[CT], dv[RT];
      UNROLL for (int m = 0; m < CT; ++m) w[m] = wcol[m * cols * ld + j];
      UNROLL for (int q = 0; q < RT; ++q) dv[q] = d[q * no + j];
      UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m) s[q][m] += dv[q] * w[m];
    }
    UNROLL for (int q = 0; q < RT; ++q) UNROLL for (int m = 0; m < CT; ++m)
      E[(r0 + q) * ni + i0 + h0 + m * cols] = s[q][m];
  }
}

// Weight gradient: dW[i0 + u ic, j0 + m jc] (+)= sum_{r < valid} A_k[r, i] D'[r, j] (the
// block's first tile writes its share, later ones add); item e: i0 = e / jc, j0 = e % jc.
// The share's sums so far are loaded before the sums: after each store, one at a time,
// they were a global load's latency each.
template <typename T, int IT, int JT>
__device__ __forceinline__ void weight_grad_items(const T* a_k, const T* D, T* dW, int ni, int no, int ic, int jc,
                                                  int valid, bool first) {
  for (int e = threadIdx.x; e < ic * jc; e += blockDim.x) {
    const int i0 = e / jc, j0 = e % jc;
    T s[IT][JT], before[IT][JT];
    UNROLL for (int u = 0; u < IT; ++u) UNROLL for (int m = 0; m < JT; ++m) {
      s[u][m] = T(0);
      before[u][m] = first ? T(0) : dW[(i0 + u * ic) * no + j0 + m * jc];
    }
    for (int r = 0; r < valid; ++r) {
      T av[IT], dv[JT];
      UNROLL for (int u = 0; u < IT; ++u) av[u] = a_k[r * ni + i0 + u * ic];
      UNROLL for (int m = 0; m < JT; ++m) dv[m] = D[r * no + j0 + m * jc];
      UNROLL for (int u = 0; u < IT; ++u) UNROLL for (int m = 0; m < JT; ++m) s[u][m] += av[u] * dv[m];
    }
    UNROLL for (int u = 0; u < IT; ++u) UNROLL for (int m = 0; m < JT; ++m) {
      const int o = (i0 + u * ic) * no + j0 + m * jc;
      dW[o] = first ? s[u][m] : before[u][m] + s[u][m];
    }
  }
}

// FN<T, rt, ct>(args...) for rt, ct in 1, 2, 4 (the launcher checks rt and ct_max, and
// tile_cols halves ct_max: nothing else reaches here)
#define MLP_TILE_CALL(FN, rt, ct, ...)                          \
  switch ((rt) * 8 + (ct)) {                                    \
    case 1 * 8 + 1: FN<T, 1, 1>(__VA_ARGS__); break;            \
    case 1 * 8 + 2: FN<T, 1, 2>(__VA_ARGS__); break;            \
    case 1 * 8 + 4: FN<T, 1, 4>(__VA_ARGS__); break;            \
    case 2 * 8 + 1: FN<T, 2, 1>(__VA_ARGS__); break;            \
    case 2 * 8 + 2: FN<T, 2, 2>(__VA_ARGS__); break;            \
    case 2 * 8 + 4: FN<T, 2, 4>(__VA_ARGS__); break;            \
    case 4 * 8 + 1: FN<T, 4, 1>(__VA_ARGS__); break;            \
    case 4 * 8 + 2: FN<T, 4, 2>(__VA_ARGS__); break;            \
    case 4 * 8 + 4: FN<T, 4, 4>(__VA_ARGS__); break;            \
  }

template <typename T>
__device__ void mlp_fused(const T* x, const int* labels, const T* targets, const long long* perm,
                          const long long* start, const T* params, T* shares, long long p, const int* dims,
                          int n_layers, int n, int rows, int rt, int ct_max, int wtile_size, int resident, T alpha,
                          int loss_kind, T smoothing, T delta, T grad_scale, T* loss_partial, unsigned int* count,
                          T* loss_out, T divisor) {
  typedef typename Acc<T>::type A;
  __shared__ union {
    A sums[MLP_THREADS];  // after the tiles: the warps' loss sums, then the last block's sum
    struct {
      long long row[MLP_MAX_ROWS];  // during a tile: its rows' places in x (-1 past n)
      int label[MLP_MAX_ROWS];      // and their labels (cross-entropy)
    } tile;
  } st;
  A* const shared = st.sums;
  T* smem = (T*)MLP_DYNAMIC_SHARED;
  const int L = n_layers, t = threadIdx.x, nt = blockDim.x, lane = t % 32, warp = t / 32, n_warps = nt / 32;
  const int* width = dims;
  const int* kind = dims + L + 1;
  const int* saves_z = dims + 2 * L + 1;
  // The tile's arrays as offsets in smem, not pointers: a pointer read back from an array
  // (local memory) is a generic one, and every access through it a 64-bit generic load or
  // store; smem + offset stays a shared-memory address (LDS/STS)
  int act_at[MLP_MAX_LAYERS + 1];  // A_k: (R, n_k) at smem + act_at[k]
  int saved_at[MLP_MAX_LAYERS];    // what f_k' reads: z_k, or A_{k+1}
  int off = 0, widest = 0;
  for (int k = 0; k <= L; ++k) {
    act_at[k] = off;
    off += rows * width[k];
    widest = max(widest, width[k]);
  }
  for (int k = 0; k < L; ++k) {
    saved_at[k] = saves_z[k] ? off : act_at[k + 1];
    if (saves_z[k]) off += rows * width[k + 1];
  }
  T* D = smem + off;         // (R, n_{k+1}) dLoss/dA_{k+1}, then D' in place
  T* E = D + rows * widest;  // (R, n_k)     D' W_k^T (before the first: the tile's targets)
  T* wtile = E + rows * widest;
  int stage_at[MLP_MAX_LAYERS];  // resident: W_k's stage at wtile + stage_at[k] (row stride n_{k+1} + 1)
  for (int k = 0, at = 0; k < L; ++k) {
    stage_at[k] = resident ? at : 0;
    at += width[k] * (width[k + 1] + 1);
  }
  if (resident) stage_resident(params, width, L, wtile, stage_at);
  T* share = shares + (long long)blockIdx.x * p;
  const int c = width[L], groups = rows / rt;  // groups: the products' row groups of rt rows
  const long long tiles = ((long long)n + rows - 1) / rows;
  A rows_loss = A(0);  // lane 0: this warp's rows' losses, in row order
  bool first = true;   // the block's first tile writes its share, later ones add to it
  // What the loops below would otherwise load again after every store (the compiler cannot
  // tell the stores from these loads), each a global load's latency: read once
  const long long first_row = perm != nullptr ? start[0] : 0;
  const int n0 = width[0], a0_at = act_at[0];
  const bool cross_entropy = loss_kind == LOSS_SOFTMAX_CROSS_ENTROPY;
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long row0 = tile * rows;
    const int valid = (int)min((long long)rows, (long long)n - row0);  // rows of this tile in the batch
    // The tile's rows: their places in x (perm's loads, one a row) and their labels, then
    // A_0 = their rows of x (past n: 0) and an elementwise loss's targets into E (free until
    // the first D' W^T), every value one load from an address in the row table,
    // MLP_STAGE_UNROLL a pass. Read as the rows were needed, a warp's loss loaded a row's
    // place and then its targets, two latencies a row and one row after another (narrow: 8
    // rows a warp a tile), and A_0 two a pass of 4 values a thread; narrow's SM, which
    // holds one block, idled meanwhile
    for (int r = t; r < rows; r += nt) {
      const long long row = r < valid ? batch_row(perm, first_row, row0 + r) : -1LL;
      st.tile.row[r] = row;
      if (cross_entropy) st.tile.label[r] = row >= 0 ? labels[row] : 0;
    }
    __syncthreads();
    const long long* const row_at = st.tile.row;
    // smem[at + r w + j] = src[row_at[r] w + j] (0 past n), r < rows, j < w
    auto gather_rows = [=](const T* src, int w, int at) {
      block_gather<MLP_STAGE_UNROLL>(
          [=](int e) {
            const long long row = row_at[e / w];
            return row < 0 ? nullptr : src + row * w + e % w;
          },
          smem, [=](int e) { return at + e; }, rows * w);
    };
    gather_rows(x, n0, a0_at);
    if (!cross_entropy) gather_rows(targets, c, (int)(E - smem));
    __syncthreads();
    long long w_off = 0;  // W_k's offset in params
    for (int k = 0; k < L; ++k) {
      const int ni = width[k], no = width[k + 1], ld = no + 1, chunk = resident ? ni : wtile_size / ld;
      const int kind_k = kind[k];
      const T* stage = wtile + stage_at[k];
      const T* W = params + w_off;
      const T* b = W + (long long)ni * no;
      const T* a_k = smem + act_at[k];
      T* const a_next = smem + act_at[k + 1];
      T* const partial = smem + saved_at[k];  // z's partial sums between chunks: z_k's place, or A_{k+1}'s
      const int ct = tile_cols(groups, no, nt, ct_max), cols = no / ct;
      for (int i0 = 0; i0 < ni; i0 += chunk) {  // z[r, j] = sum_i A_k[r, i] W[i, j] + b[j]
        const int i1 = min(ni, i0 + chunk);
        if (!resident) stage_rows(W, no, i0, i1, wtile, ld);
        MLP_TILE_CALL(forward_items, rt, ct, a_k, stage, b, partial, ni, no, ld, i0, i1, groups * cols, cols)
        __syncthreads();
      }
      // A_{k+1} = f_k(z_k): from z_k's place (kept), or in place
      for (int e = t; e < rows * no; e += nt) a_next[e] = act_forward(kind_k, partial[e], alpha);
      __syncthreads();
      w_off += (long long)ni * no + no;
    }
    for (int r = warp; r < rows; r += n_warps) {  // the loss: a warp per row
      if (r < valid) {  // its targets: row r of E (gathered with A_0)
        const int label = cross_entropy ? st.tile.label[r] : 0;
        const T l = loss_row<T>(loss_kind, smem + act_at[L] + r * c, label, E + r * c, D + r * c, c, smoothing, delta,
                                grad_scale, nullptr);
        if (lane == 0) rows_loss += A(l);
      } else {
        for (int j = lane; j < c; j += 32) D[r * c + j] = T(0);
      }
    }
    __syncthreads();
    for (int k = L - 1; k >= 0; --k) {
      const int ni = width[k], no = width[k + 1];
      w_off -= (long long)ni * no + no;
      const T* W = params + w_off;
      const int kind_k = kind[k];
      const T* a_k = smem + act_at[k];
      const T* saved_k = smem + saved_at[k];
      for (int e = t; e < rows * no; e += nt) D[e] *= act_grad(kind_k, saved_k[e], alpha);  // D' = D * f_k'
      __syncthreads();
      T* dW = share + w_off;
      // dW[i, j] += sum_r A_k[r, i] D'[r, j], a thread taking it rows i (ic apart) by jt
      // columns j (jc apart). The parameter gradients sum the tile's rows in the batch only
      // (a padded row's activations, from x = 0, are never multiplied in)
      const int jt = tile_cols(ni, no, nt, ct_max), jc = no / jt;
      const int it = tile_cols(jc, ni, nt, ct_max), ic = ni / it;
      MLP_TILE_CALL(weight_grad_items, it, jt, a_k, D, dW, ni, no, ic, jc, valid, first)
      T* db = dW + (long long)ni * no;
      for (int j = t; j < no; j += nt) {  // db[j] += sum_r D'[r, j]
        const T before = first ? T(0) : db[j];
        T s = T(0);
        for (int r = 0; r < valid; ++r) s += D[r * no + j];
        db[j] = first ? s : before + s;
      }
      if (k > 0) {
        const int ld = no + 1, chunk = resident ? ni : wtile_size / ld;
        const T* stage = wtile + stage_at[k];
        for (int i0 = 0; i0 < ni; i0 += chunk) {  // E[r, i] = sum_j D'[r, j] W[i, j], i in the chunk
          const int i1 = min(ni, i0 + chunk), ci = i1 - i0;
          const int ct = tile_cols(groups, ci, nt, ct_max), cols = ci / ct;
          if (!resident) stage_rows(W, no, i0, i1, wtile, ld);
          MLP_TILE_CALL(input_grad_items, rt, ct, D, stage, E, ni, no, ld, i0, groups * cols, cols)
          __syncthreads();
        }
      }
      __syncthreads();
      T* swap = D;
      D = E;
      E = swap;
    }
    first = false;
  }
  if (lane == 0) shared[warp] = rows_loss;
  __syncthreads();
  if (t == 0) {
    A block_total = A(0);
    for (int w = 0; w < n_warps; ++w) block_total += shared[w];  // warp order
    loss_partial[blockIdx.x] = block_total;
  }
  if (!last_block(count)) return;
  const A total = block_sum_of<A>((const volatile A*)loss_partial, gridDim.x, shared);
  if (t == 0) loss_out[0] = T(divisor == T(1) ? total : total / divisor);
}

// g[i] = sum_b shares[b p + i], b = 0..n_shares-1 in order (common.cuh's sum_of_shares)
template <typename T>
__device__ void sum_shares(const T* shares, int n_shares, long long p, T* g) {
  GRID_STRIDE_LOOP(i, p) sum_of_shares(shares, n_shares, p, i, g);
}

#define MLP_KERNELS(T, S)                                                                                  \
  extern "C" __global__ void mlp_fused_##S(const T* x, const int* labels, const T* targets,                \
                                           const long long* perm, const long long* start, int windowed,   \
                                           const T* params, T* shares, long long p, const int* dims,      \
                                           int n_layers, int n, int rows, int rt, int ct_max,             \
                                           int wtile_size, int resident, T alpha, int loss_kind,          \
                                           T smoothing, T delta, T grad_scale, T* loss_partial,           \
                                           unsigned int* count, T* loss_out, T divisor) {                 \
    mlp_fused<T>(x, labels, targets, windowed ? perm : nullptr, start, params, shares, p, dims, n_layers,  \
                 n, rows, rt, ct_max, wtile_size, resident, alpha, loss_kind, smoothing, delta, grad_scale, \
                 loss_partial, count, loss_out, divisor);                                                  \
  }                                                                                                        \
  extern "C" __global__ void sum_shares_##S(const T* shares, int n_shares, long long p, T* g) {             \
    sum_shares<T>(shares, n_shares, p, g);                                                                 \
  }
FOR_FLOAT_TYPES(MLP_KERNELS)
