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
#define MLP_MAX_RT 4             // rows per thread in the products at most
#define MLP_MAX_CT 4             // columns per thread in the products at most

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

// The batch's row b in x, labels, targets: perm[start[0] + b] (windowed: the rows of a
// resident split in the epoch's order, read where they lie, with no gather before), else b.
__device__ __forceinline__ long long batch_row(const long long* perm, const long long* start, long long b) {
  return perm != nullptr ? perm[start[0] + b] : b;
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
// rt (1..MLP_MAX_RT, dividing rows): rows a thread takes in the forward products and in
// D' W^T; ct_max (1, 2 or 4): columns a thread takes at most (tile_cols), in those and in
// the weight gradient's A^T D' (there: rows i and columns j). Each element's sum has the
// same order whatever rt and ct_max are (over i, then + b; over the tile's rows), so they
// change the speed, not the bits.
// Shared memory (dynamic, rows x per-row values then wtile_size values): R x width each:
// A_0..A_L, then z_k for each layer that saves it, then D and E (R x max width): the
// gradient carried down and the next one. Then wtile: rows i0 .. i1 - 1 of W_k (row
// stride n_{k+1} + 1: the backward product's threads read one column of different rows,
// which the padding puts in different banks). A forward element's sum over i runs across
// the chunks in order (its partial sum kept in its output's place in between), so the
// chunks change the speed, not the bits.
// wtile[(i - i0) ld + j] = W[i, j] for i0 <= i < i1 (W: (., no) row-major), every thread
// loading, after the block is done with what wtile held before (the barrier before) and
// before anyone reads it (the one after)
template <typename T>
__device__ __forceinline__ void stage_rows(const T* W, int no, int i0, int i1, T* wtile, int ld) {
  __syncthreads();
  for (int e = threadIdx.x; e < (i1 - i0) * no; e += blockDim.x) wtile[e / no * ld + e % no] = W[(long long)i0 * no + e];
  __syncthreads();
}

template <typename T>
__device__ void mlp_fused(const T* x, const int* labels, const T* targets, const long long* perm,
                          const long long* start, const T* params, T* shares, long long p, const int* dims,
                          int n_layers, int n, int rows, int rt, int ct_max, int wtile_size, T alpha, int loss_kind,
                          T smoothing, T delta, T grad_scale, T* loss_partial, unsigned int* count, T* loss_out,
                          T divisor) {
  typedef typename Acc<T>::type A;
  __shared__ A shared[MLP_THREADS];
  T* smem = (T*)MLP_DYNAMIC_SHARED;
  const int L = n_layers, t = threadIdx.x, nt = blockDim.x, lane = t % 32, warp = t / 32, n_warps = nt / 32;
  const int* width = dims;
  const int* kind = dims + L + 1;
  const int* saves_z = dims + 2 * L + 1;
  T* act[MLP_MAX_LAYERS + 1];  // A_k: (R, n_k)
  T* saved[MLP_MAX_LAYERS];    // what f_k' reads: z_k, or A_{k+1}
  int off = 0, widest = 0;
  for (int k = 0; k <= L; ++k) {
    act[k] = smem + off;
    off += rows * width[k];
    widest = max(widest, width[k]);
  }
  for (int k = 0; k < L; ++k) {
    saved[k] = saves_z[k] ? smem + off : act[k + 1];
    if (saves_z[k]) off += rows * width[k + 1];
  }
  T* D = smem + off;         // (R, n_{k+1}) dLoss/dA_{k+1}, then D' in place
  T* E = D + rows * widest;  // (R, n_k)     D' W_k^T
  T* wtile = E + rows * widest;
  T* share = shares + (long long)blockIdx.x * p;
  const int c = width[L], groups = rows / rt;  // groups: the products' row groups of rt rows
  const long long tiles = ((long long)n + rows - 1) / rows;
  A rows_loss = A(0);  // lane 0: this warp's rows' losses, in row order
  bool first = true;   // the block's first tile writes its share, later ones add to it
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const long long row0 = tile * rows;
    const int valid = (int)min((long long)rows, (long long)n - row0);  // rows of this tile in the batch
    for (int e = t; e < rows * width[0]; e += nt) {  // A_0 = the tile's rows of x (past n: 0)
      const int r = e / width[0];
      act[0][e] = r < valid ? x[batch_row(perm, start, row0 + r) * width[0] + e % width[0]] : T(0);
    }
    __syncthreads();
    long long w_off = 0;  // W_k's offset in params
    for (int k = 0; k < L; ++k) {
      const int ni = width[k], no = width[k + 1], ld = no + 1, chunk = wtile_size / ld;
      const T* W = params + w_off;
      const T* b = W + (long long)ni * no;
      T* partial = saved[k];  // z's partial sums between chunks: z_k's place, or A_{k+1}'s
      const int ct = tile_cols(groups, no, nt, ct_max), cols = no / ct;
      for (int i0 = 0; i0 < ni; i0 += chunk) {  // z[r, j] = sum_i A_k[r, i] W[i, j] + b[j]
        const int i1 = min(ni, i0 + chunk);
        stage_rows(W, no, i0, i1, wtile, ld);
        for (int e = t; e < groups * cols; e += nt) {
          const int r0 = e / cols * rt, j0 = e % cols;  // rows r0 .. r0 + rt - 1, columns j0 + m cols
          const T* a = act[k] + r0 * ni;
          T z[MLP_MAX_RT][MLP_MAX_CT];
          UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m)
            z[q][m] = (q < rt && m < ct && i0 > 0) ? partial[(r0 + q) * no + j0 + m * cols] : T(0);
          for (int i = i0; i < i1; ++i) {
            T w[MLP_MAX_CT];  // each read once for the rt rows
            UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) w[m] = m < ct ? wtile[(i - i0) * ld + j0 + m * cols] : T(0);
            UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) if (q < rt) {
              const T aq = a[q * ni + i];  // read once for the ct columns
              UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) if (m < ct) z[q][m] += aq * w[m];
            }
          }
          UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) if (q < rt && m < ct) {
            const int j = j0 + m * cols, o = (r0 + q) * no + j;
            if (i1 < ni) {
              partial[o] = z[q][m];  // the sum so far; the next chunk goes on from it
            } else {
              const T zq = z[q][m] + b[j];
              if (saves_z[k]) saved[k][o] = zq;
              act[k + 1][o] = act_forward(kind[k], zq, alpha);
            }
          }
        }
        __syncthreads();
      }
      w_off += (long long)ni * no + no;
    }
    for (int r = warp; r < rows; r += n_warps) {  // the loss: a warp per row
      if (r < valid) {
        const long long row = batch_row(perm, start, row0 + r);
        const T l = loss_row<T>(loss_kind, act[L] + r * c, loss_kind == LOSS_SOFTMAX_CROSS_ENTROPY ? labels[row] : 0,
                                targets + row * c, D + r * c, c, smoothing, delta, grad_scale, nullptr);
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
      for (int e = t; e < rows * no; e += nt) D[e] *= act_grad(kind[k], saved[k][e], alpha);  // D' = D * f_k'
      __syncthreads();
      T* dW = share + w_off;
      // dW[i, j] += sum_r A_k[r, i] D'[r, j], a thread taking it rows i (ic apart) by jt
      // columns j (jc apart). The parameter gradients sum the tile's rows in the batch only
      // (a padded row's activations, from x = 0, are never multiplied in)
      const int jt = tile_cols(ni, no, nt, ct_max), jc = no / jt;
      const int it = tile_cols(jc, ni, nt, ct_max), ic = ni / it;
      for (int e = t; e < ic * jc; e += nt) {
        const int i0 = e / jc, j0 = e % jc;
        T s[MLP_MAX_CT][MLP_MAX_CT];
        UNROLL for (int u = 0; u < MLP_MAX_CT; ++u) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) s[u][m] = T(0);
        for (int r = 0; r < valid; ++r) {
          T av[MLP_MAX_CT], dv[MLP_MAX_CT];
          UNROLL for (int u = 0; u < MLP_MAX_CT; ++u) av[u] = u < it ? act[k][r * ni + i0 + u * ic] : T(0);
          UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) dv[m] = m < jt ? D[r * no + j0 + m * jc] : T(0);
          UNROLL for (int u = 0; u < MLP_MAX_CT; ++u) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m)
            if (u < it && m < jt) s[u][m] += av[u] * dv[m];
        }
        UNROLL for (int u = 0; u < MLP_MAX_CT; ++u) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) if (u < it && m < jt) {
          const int o = (i0 + u * ic) * no + j0 + m * jc;
          dW[o] = first ? s[u][m] : dW[o] + s[u][m];
        }
      }
      T* db = dW + (long long)ni * no;
      for (int j = t; j < no; j += nt) {  // db[j] += sum_r D'[r, j]
        T s = T(0);
        for (int r = 0; r < valid; ++r) s += D[r * no + j];
        db[j] = first ? s : db[j] + s;
      }
      if (k > 0) {
        const int ld = no + 1, chunk = wtile_size / ld;
        for (int i0 = 0; i0 < ni; i0 += chunk) {  // E[r, i] = sum_j D'[r, j] W[i, j], i in the chunk
          const int i1 = min(ni, i0 + chunk), ci = i1 - i0;
          const int ct = tile_cols(groups, ci, nt, ct_max), cols = ci / ct;
          stage_rows(W, no, i0, i1, wtile, ld);
          for (int e = t; e < groups * cols; e += nt) {
            const int r0 = e / cols * rt, h0 = e % cols;  // rows r0 .. r0 + rt - 1, columns i0 + h0 + m cols
            const T* d = D + r0 * no;
            T s[MLP_MAX_RT][MLP_MAX_CT];
            UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) s[q][m] = T(0);
            for (int j = 0; j < no; ++j) {
              T w[MLP_MAX_CT];  // each read once for the rt rows
              UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) w[m] = m < ct ? wtile[(h0 + m * cols) * ld + j] : T(0);
              UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) if (q < rt) {
                const T dq = d[q * no + j];  // read once for the ct columns
                UNROLL for (int m = 0; m < MLP_MAX_CT; ++m) if (m < ct) s[q][m] += dq * w[m];
              }
            }
            UNROLL for (int q = 0; q < MLP_MAX_RT; ++q) UNROLL for (int m = 0; m < MLP_MAX_CT; ++m)
              if (q < rt && m < ct) E[(r0 + q) * ni + i0 + h0 + m * cols] = s[q][m];
          }
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
                                           int wtile_size, T alpha, int loss_kind, T smoothing, T delta,  \
                                           T grad_scale, T* loss_partial, unsigned int* count,            \
                                           T* loss_out, T divisor) {                                      \
    mlp_fused<T>(x, labels, targets, windowed ? perm : nullptr, start, params, shares, p, dims, n_layers,  \
                 n, rows, rt, ct_max, wtile_size, alpha, loss_kind, smoothing, delta, grad_scale,          \
                 loss_partial, count, loss_out, divisor);                                                  \
  }                                                                                                        \
  extern "C" __global__ void sum_shares_##S(const T* shares, int n_shares, long long p, T* g) {             \
    sum_shares<T>(shares, n_shares, p, g);                                                                 \
  }
FOR_FLOAT_TYPES(MLP_KERNELS)
