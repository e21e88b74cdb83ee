// reduce.cu: deterministic reductions (fixed partition, fixed tree order; the one atomic
// only picks which block finishes, never what is summed in which order).
//   bias_grad:   db[j] = sum_i D'[i, j]                  column sums of (n_rows, n_cols)
//   act_backward_bias_grad: D' = D * f'(saved) written, and db as bias_grad of that D'
//                in the same pass (the same sums, in the same order: the same bits)
//   sum:         out = (sum_i x_i or x_i^2) / divisor    one launch: blocks, then the last block
//   accuracy:    correct[i] = [argmax_j x[i, j] == label_i]
// 16-bit storage (bf16_t, f16_t): bias_grad and accuracy read widened values; the
// column sums accumulate and land in float (the parameter gradients are float32).
#include "common.cuh"
#include "precision.cuh"
#include "activations.cuh"

// ---- column sums: pass 1 over row chunks, pass 2 over chunks -----------------------
// block (32, 8): threadIdx.x picks the column of a 32-wide tile, threadIdx.y strides the
// rows of chunk blockIdx.y, summing value(i, fetch(i)) of each element i = r * n_cols + col
// it visits, in row order; the 8 row threads' sums are added in a fixed order into
// partial[chunk, col] (partial: (n_chunks, n_cols), or the output when n_chunks == 1).
// finish (n_cols <= 256: one block's threads cover the columns): the block that finishes
// last (last_block; count its counter) does pass 2 itself, in bias_grad_finish's order.
// A thread fetches ELEM_UNROLL of its rows (fetch: the loads) before it uses them (value:
// the arithmetic, and any store): a store between two rows' loads would keep the second
// load waiting for it (common.cuh GRID_STRIDE_UNROLLED). The sums' order is the rows'.
template <typename T, typename Fetch, typename Value>
__device__ void column_sums(Fetch fetch, Value value, T* partial, int n_rows, int n_cols, int rows_per_chunk,
                            int finish, unsigned int* count, T* out) {
  typedef typename Acc<T>::type A;
  typedef decltype(fetch(0LL)) Fetched;
  __shared__ A tile[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int row0 = blockIdx.y * rows_per_chunk;
  const int row1 = min(n_rows, row0 + rows_per_chunk);
  A s = A(0);
  if (col < n_cols)
    for (int r0 = row0 + threadIdx.y; r0 < row1; r0 += 8 * ELEM_UNROLL) {
      Fetched got[ELEM_UNROLL];
      UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
        const int r = r0 + 8 * u;
        got[u] = r < row1 ? fetch((long long)r * n_cols + col) : Fetched();
      }
      UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
        const int r = r0 + 8 * u;
        if (r >= row1) break;
        s += value((long long)r * n_cols + col, got[u]);
      }
    }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n_cols) {
    A total = tile[0][threadIdx.x];
    for (int k = 1; k < 8; ++k) total += tile[k][threadIdx.x];  // fixed order
    partial[(long long)blockIdx.y * n_cols + col] = T(total);
  }
  if (!finish || !last_block(count)) return;  // (`finish` is the same in every block)
  const volatile T* p = partial;
  for (int j = threadIdx.y * 32 + threadIdx.x; j < n_cols; j += 256) {
    A s2 = A(0);
    for (int c = 0; c < (int)gridDim.y; ++c) s2 += p[(long long)c * n_cols + j];  // chunks in order
    out[j] = T(s2);
  }
}

// db = column sums of d (pass 1; see column_sums)
template <typename S>
__device__ void bias_grad_partial(const S* d, typename Math<S>::type* partial, int n_rows, int n_cols,
                                  int rows_per_chunk, int finish, unsigned int* count,
                                  typename Math<S>::type* out) {
  typedef typename Math<S>::type T;
  column_sums([&](long long i) { return load(d[i]); }, [](long long, T v) { return v; }, partial, n_rows, n_cols,
              rows_per_chunk, finish, count, out);
}

// bias_grad_partial over D' = D * f'(saved), which it writes to dz as it goes (act_backward's
// value, rounded to S once; dz may be d): each stored value is the one summed, so db has the
// bits of act_backward followed by bias_grad, with one read of D' less.
template <typename S>
__device__ void act_backward_bias_grad_partial(const S* d, const S* saved, S* dz, int kind,
                                               typename Math<S>::type alpha, typename Math<S>::type* partial,
                                               int n_rows, int n_cols, int rows_per_chunk, int finish,
                                               unsigned int* count, typename Math<S>::type* out) {
  typedef typename Math<S>::type T;
  struct Pair {
    T d, saved;
  };
  auto fetch = [&](long long i) { return Pair{load(d[i]), load(saved[i])}; };
  auto value = [&](long long i, Pair p) {
    const S v = store_math<S>(p.d * act_grad(kind, p.saved, alpha));
    dz[i] = v;
    return load(v);
  };
  column_sums(fetch, value, partial, n_rows, n_cols, rows_per_chunk, finish, count, out);
}

// out[j] = sum_c partial[c, j], c in order
template <typename T>
__device__ void bias_grad_finish(const T* partial, T* out, int n_chunks, int n_cols) {
  typedef typename Acc<T>::type A;
  GRID_STRIDE_LOOP(j, n_cols) {
    A s = A(0);
    for (int c = 0; c < n_chunks; ++c) s += partial[(long long)c * n_cols + j];
    out[j] = T(s);
  }
}

// ---- sum of a flat buffer, one launch: common.cuh's sum_all

// ---- accuracy: one thread per row ---------------------------------------------------
// x: (n_rows, n_cols); labels: (n_rows,); correct: (n_rows,) 0/1.
// n_cols > 1: class = first index of the maximum (NaN counts as the maximum, as NumPy's
// argmax); n_cols == 1: class = [x > threshold].
template <typename S>
__device__ void accuracy_rows(const S* x, const int* labels, int* correct, int n_rows, int n_cols,
                              typename Math<S>::type threshold) {
  typedef typename Math<S>::type T;
  GRID_STRIDE_LOOP(r, n_rows) {
    const S* row = x + r * n_cols;
    int pred;
    if (n_cols == 1) {
      pred = load(row[0]) > threshold ? 1 : 0;
    } else {
      pred = 0;
      T best = load(row[0]);
      for (int j = 1; j < n_cols && best == best; ++j) {
        T v = load(row[j]);
        if (v > best || v != v) {
          best = v;
          pred = j;
        }
      }
    }
    correct[r] = pred == labels[r] ? 1 : 0;
  }
}

#define REDUCE_KERNELS(T, S)                                                                                      \
  extern "C" __global__ void bias_grad_partial_##S(const T* d, T* partial, int n_rows, int n_cols,                \
                                                    int rows_per_chunk, int finish, unsigned int* count,          \
                                                    T* out) {                                                     \
    bias_grad_partial<T>(d, partial, n_rows, n_cols, rows_per_chunk, finish, count, out);                         \
  }                                                                                                               \
  extern "C" __global__ void bias_grad_finish_##S(const T* partial, T* out, int n_chunks, int n_cols) {           \
    bias_grad_finish<T>(partial, out, n_chunks, n_cols);                                                          \
  }                                                                                                               \
  extern "C" __global__ void act_backward_bias_grad_partial_##S(                                                  \
      const T* d, const T* saved, T* dz, int kind, T alpha, T* partial, int n_rows, int n_cols,                   \
      int rows_per_chunk, int finish, unsigned int* count, T* out) {                                              \
    act_backward_bias_grad_partial<T>(d, saved, dz, kind, alpha, partial, n_rows, n_cols, rows_per_chunk, finish, \
                                      count, out);                                                                \
  }                                                                                                               \
  extern "C" __global__ void sum_##S(const T* x, long long n, int square, T* partial, unsigned int* count,       \
                                      T* out, T divisor) {                                                        \
    sum_all<T, T, T>(x, n, square, partial, count, out, divisor);                                                 \
  }                                                                                                               \
  extern "C" __global__ void accuracy_rows_##S(const T* x, const int* labels, int* correct, int n_rows,           \
                                                int n_cols, T threshold) {                                        \
    accuracy_rows<T>(x, labels, correct, n_rows, n_cols, threshold);                                              \
  }
FOR_FLOAT_TYPES(REDUCE_KERNELS)

// 16-bit storage: the column sums (float partials, finished by bias_grad_finish_f32) and accuracy
#define REDUCE_LOW_KERNELS(T, S)                                                                              \
  extern "C" __global__ void bias_grad_partial_##S(const T* d, float* partial, int n_rows, int n_cols,        \
                                                    int rows_per_chunk, int finish, unsigned int* count,      \
                                                    float* out) {                                             \
    bias_grad_partial<T>(d, partial, n_rows, n_cols, rows_per_chunk, finish, count, out);                     \
  }                                                                                                           \
  extern "C" __global__ void act_backward_bias_grad_partial_##S(                                              \
      const T* d, const T* saved, T* dz, int kind, float alpha, float* partial, int n_rows, int n_cols,       \
      int rows_per_chunk, int finish, unsigned int* count, float* out) {                                      \
    act_backward_bias_grad_partial<T>(d, saved, dz, kind, alpha, partial, n_rows, n_cols, rows_per_chunk,     \
                                      finish, count, out);                                                    \
  }                                                                                                           \
  extern "C" __global__ void accuracy_rows_##S(const T* x, const int* labels, int* correct, int n_rows,       \
                                                int n_cols, float threshold) {                                \
    accuracy_rows<T>(x, labels, correct, n_rows, n_cols, threshold);                                          \
  }
FOR_LOW_TYPES(REDUCE_LOW_KERNELS)

// integer sums (accuracy counts): int inputs, long long partials and result
extern "C" __global__ void sum_i32(const int* x, long long n, int square, long long* partial, unsigned int* count,
                                   long long* out, long long divisor) {
  sum_all<int, long long, long long>(x, n, square, partial, count, out, divisor);
}
