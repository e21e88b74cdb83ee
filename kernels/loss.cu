// loss.cu: each loss's value and gradient in one pass over the rows.
//   row_loss[i] = the loss of row i (summed over its elements)
//   grad[i, j]  = dL/dx[i, j] of the batch-mean loss (grad_scale = 1/N or 1/(N C))
// The batch mean sum_i row_loss[i] / divisor comes from the same launch (`finish`: block
// partials, finished by the last block; common.cuh's last_block). One warp per row;
// lanes stride the C columns.
// 16-bit storage (bf16_t, f16_t; mixed precision): x is widened to float, the loss is
// computed in float (row_loss float, targets float32), and each gradient element is
// rounded once to 16 bits after the multiplication by fp16's loss scale S (a device
// value, loss_scale[0]; the value itself is never scaled). float/double: no S.
#include "common.cuh"
#include "precision.cuh"
#include "activations.cuh"

// kind ids: LossInfo.kernel_id in gpubp/losses.py
#define LOSS_SOFTMAX_CROSS_ENTROPY 0
#define LOSS_BINARY_CROSS_ENTROPY 1
#define LOSS_MSE 2
#define LOSS_HUBER 3

// Softmax cross-entropy of one row, label y, smoothing e:
//   m = max_j x_j, lse = log sum_j exp(x_j - m), logp_j = (x_j - m) - lse
//   loss = -(1 - e) logp_y - (e / C) sum_j logp_j
//   grad_j = (exp(logp_j) - e / C - (1 - e) [j = y]) * grad_scale
// A label outside [0, C) makes the row's loss and gradient NaN (visible, not silent).
template <typename S, typename T>
__device__ void cross_entropy_row(const S* x, int y, S* grad, T* row_loss, int c, T e, T grad_scale,
                                  const T* loss_scale) {
  const int lane = threadIdx.x % 32;
  T m = -inf_value<T>();
  for (int j = lane; j < c; j += 32) {
    T xj = load(x[j]);
    m = (xj > m || xj != xj) ? xj : m;
  }
  m = warp_max(m);
  T sum_exp = T(0);
  for (int j = lane; j < c; j += 32) sum_exp += m_exp(load(x[j]) - m);
  const T lse = m_log(warp_sum(sum_exp));
  const bool valid = y >= 0 && y < c;
  T sum_logp = T(0);
  for (int j = lane; j < c; j += 32) {
    T logp = (load(x[j]) - m) - lse;
    sum_logp += logp;
    if (grad != nullptr) {
      T g = m_exp(logp) - e / T(c);
      if (j == y) g -= T(1) - e;
      T gj = valid ? g * grad_scale : nan_value<T>();
      if (loss_scale != nullptr) gj *= loss_scale[0];
      grad[j] = store_math<S>(gj);
    }
  }
  sum_logp = warp_sum(sum_logp);
  if (lane == 0) {
    T nll = valid ? -((load(x[y]) - m) - lse) : nan_value<T>();
    row_loss[0] = e != T(0) ? (T(1) - e) * nll - (e / T(c)) * sum_logp : nll;
  }
}

// Elementwise losses of one row: l_j and dl_j/dx_j (before grad_scale)
template <typename T>
__device__ __forceinline__ T elementwise_loss(int kind, T x, T t, T delta, T* dl) {
  if (kind == LOSS_BINARY_CROSS_ENTROPY) {  // max(x, 0) - x t + log(1 + exp(-|x|)); sigmoid(x) - t
    *dl = sigmoid(x) - t;
    return (x > T(0) ? x : T(0)) - x * t + m_log1p(m_exp(-m_fabs(x)));
  }
  T r = x - t;
  if (kind == LOSS_MSE) {  // r^2; 2 r
    *dl = T(2) * r;
    return r * r;
  }
  // LOSS_HUBER: r^2/2 if |r| < delta else delta (|r| - delta/2); r or delta sign(r)
  T a = m_fabs(r);
  if (a < delta) {
    *dl = r;
    return T(0.5) * r * r;
  }
  *dl = r > T(0) ? delta : (r < T(0) ? -delta : r);  // r is NaN here when neither
  return delta * (a - T(0.5) * delta);
}

// x: (n, c) outputs; labels: (n,) for cross-entropy, else targets: (n, c);
// grad: (n, c), written when write_grad (else the value alone); row_loss: (n,);
// finish: out[0] = sum_i row_loss[i] / divisor as well, in one launch: each warp adds its
// rows' losses in row order, the block its warps' sums in warp order into
// partial[blockIdx.x], and the block that finishes last (last_block; count its counter)
// sums the partials (block_sum_of). A function of n and the grid: the same bits each run.
template <typename S>
__device__ void loss_rows(const S* x, const int* labels, const typename Math<S>::type* targets, S* grad,
                          int write_grad, typename Math<S>::type* row_loss, int n, int c, int kind,
                          typename Math<S>::type smoothing, typename Math<S>::type delta,
                          typename Math<S>::type grad_scale, const typename Math<S>::type* loss_scale,
                          int finish, typename Math<S>::type* partial, unsigned int* count,
                          typename Math<S>::type* out, typename Math<S>::type divisor) {
  typedef typename Math<S>::type T;
  typedef typename Acc<T>::type A;
  __shared__ A shared[1024];
  A rows_sum = A(0);  // lane 0: this warp's rows' losses, in row order
  const int lane = threadIdx.x % 32;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const long long n_warps = ((long long)gridDim.x * blockDim.x) / 32;
  for (long long r = warp; r < n; r += n_warps) {
    const S* xr = x + r * c;
    S* gr = write_grad ? grad + r * c : nullptr;
    if (kind == LOSS_SOFTMAX_CROSS_ENTROPY) {
      cross_entropy_row(xr, labels[r], gr, row_loss + r, c, smoothing, grad_scale, loss_scale);
      if (lane == 0) rows_sum += A(row_loss[r]);  // lane 0 wrote it
      continue;
    }
    const T* tr = targets + r * c;
    A s = A(0);
    for (int j = lane; j < c; j += 32) {
      T dl;
      s += A(elementwise_loss(kind, load(xr[j]), tr[j], delta, &dl));
      if (gr != nullptr) {
        T gj = dl * grad_scale;
        if (loss_scale != nullptr) gj *= loss_scale[0];
        gr[j] = store_math<S>(gj);
      }
    }
    s = warp_sum(s);
    if (lane == 0) {
      row_loss[r] = T(s);
      rows_sum += A(T(s));
    }
  }
  if (!finish) return;  // (the same in every block)
  if (lane == 0) shared[threadIdx.x / 32] = rows_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A block_total = A(0);
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) block_total += shared[w];  // warp order
    partial[blockIdx.x] = block_total;
  }
  if (!last_block(count)) return;
  const A total = block_sum_of<A>((const volatile A*)partial, gridDim.x, shared);
  if (threadIdx.x == 0) out[0] = T(divisor == T(1) ? total : total / divisor);
}

#define LOSS_KERNELS(T, S)                                                                                     \
  extern "C" __global__ void loss_rows_##S(const T* x, const int* labels, const T* targets, T* grad,           \
                                            int write_grad, T* row_loss, int n, int c, int kind, T smoothing,  \
                                            T delta, T grad_scale, int finish, T* partial, unsigned int* count, \
                                            T* out, T divisor) {                                               \
    loss_rows<T>(x, labels, targets, grad, write_grad, row_loss, n, c, kind, smoothing, delta, grad_scale,     \
                 nullptr, finish, partial, count, out, divisor);                                               \
  }
FOR_FLOAT_TYPES(LOSS_KERNELS)

// 16-bit storage: float targets, row losses and scalars; loss_scale: one device float (S, or 1)
#define LOSS_LOW_KERNELS(T, S)                                                                                 \
  extern "C" __global__ void loss_rows_##S(const T* x, const int* labels, const float* targets, T* grad,       \
                                            int write_grad, float* row_loss, int n, int c, int kind,           \
                                            float smoothing, float delta, float grad_scale,                    \
                                            const float* loss_scale, int finish, float* partial,               \
                                            unsigned int* count, float* out, float divisor) {                  \
    loss_rows<T>(x, labels, targets, grad, write_grad, row_loss, n, c, kind, smoothing, delta, grad_scale,     \
                 loss_scale, finish, partial, count, out, divisor);                                            \
  }
FOR_LOW_TYPES(LOSS_LOW_KERNELS)
