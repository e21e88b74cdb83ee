// loss.cu: each loss's value and gradient in one pass over the rows.
//   row_loss[i] = the loss of row i (summed over its elements)
//   grad[i, j]  = dL/dx[i, j] of the batch-mean loss (grad_scale = 1/N or 1/(N C))
// The batch mean sum_i row_loss[i] / divisor comes from the same launch (`finish`: block
// partials, finished by the last block; common.cuh's last_block). A group of `width`
// lanes per row (the smallest power of two >= C, at most 32: a warp takes 32 / width rows
// at once), its lanes striding the C columns.
// 16-bit storage (bf16_t, f16_t; mixed precision): x is widened to float, the loss is
// computed in float (row_loss float, targets float32), and each gradient element is
// rounded once to 16 bits after the multiplication by fp16's loss scale S (a device
// value, loss_scale[0]; the value itself is never scaled). float/double: no S.
#include "loss.cuh"

// x: (n, c) outputs; labels: (n,) for cross-entropy, else targets: (n, c); where
// `windowed`, row r's label or targets are row perm[start[0] + r] of a whole split's
// (the step's batch read where it lies: no gather of its targets first), else row r;
// grad: (n, c), written when write_grad (else the value alone); row_loss: (n,);
// finish: out[0] = sum_i row_loss[i] / divisor as well, in one launch: each group adds
// its rows' losses in row order, the block its groups' sums in group order into
// partial[blockIdx.x], and the block that finishes last (last_block; count its counter)
// sums the partials (block_sum_of). A function of n, c and the grid: the same bits each run.
// The warp's groups run the rows base .. base + 32 / width - 1 together, every lane
// through every shuffle; a group past the last row runs with no columns (c = 0).
template <typename S>
__device__ void loss_rows(const S* x, const int* labels, const typename Math<S>::type* targets,
                          const long long* perm, const long long* start, int windowed, S* grad, int write_grad,
                          typename Math<S>::type* row_loss, int n, int c, int width, int kind,
                          typename Math<S>::type smoothing, typename Math<S>::type delta,
                          typename Math<S>::type grad_scale, const typename Math<S>::type* loss_scale,
                          int finish, typename Math<S>::type* partial, unsigned int* count,
                          typename Math<S>::type* out, typename Math<S>::type divisor) {
  typedef typename Math<S>::type T;
  typedef typename Acc<T>::type A;
  __shared__ A shared[1024];
  A rows_sum = A(0);  // a group's first lane: its rows' losses, in row order
  const int lane = threadIdx.x % width, groups_per_warp = 32 / width;
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const long long n_warps = ((long long)gridDim.x * blockDim.x) / 32;
  const long long first = windowed ? start[0] : 0;  // the window's first place in perm
  for (long long base = warp * groups_per_warp; base < n; base += n_warps * groups_per_warp) {
    const long long r = base + (threadIdx.x % 32) / width;  // this group's row
    const bool has_row = r < n;
    const long long at = has_row ? r : base;
    const long long tr = windowed ? perm[first + at] : at;  // its targets' row
    const T l = loss_row<S>(kind, x + at * c, has_row && kind == LOSS_SOFTMAX_CROSS_ENTROPY ? labels[tr] : 0,
                            targets + tr * c, write_grad && has_row ? grad + r * c : nullptr, has_row ? c : 0,
                            smoothing, delta, grad_scale, loss_scale, width);
    if (lane == 0 && has_row) {
      row_loss[r] = l;
      rows_sum += A(l);
    }
  }
  if (!finish) return;  // (the same in every block)
  if (lane == 0) shared[threadIdx.x / width] = rows_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A block_total = A(0);
    for (int g = 0; g < (int)(blockDim.x / width); ++g) block_total += shared[g];  // group order
    partial[blockIdx.x] = block_total;
  }
  if (!last_block(count)) return;
  const A total = block_sum_of<A>((const volatile A*)partial, gridDim.x, shared);
  if (threadIdx.x == 0) out[0] = T(divisor == T(1) ? total : total / divisor);
}

#define LOSS_KERNELS(T, S)                                                                                     \
  extern "C" __global__ void loss_rows_##S(const T* x, const int* labels, const T* targets,                   \
                                            const long long* perm, const long long* start, int windowed,       \
                                            T* grad, int write_grad, T* row_loss, int n, int c, int width,     \
                                            int kind, T smoothing, T delta, T grad_scale, int finish,          \
                                            T* partial, unsigned int* count, T* out, T divisor) {              \
    loss_rows<T>(x, labels, targets, perm, start, windowed, grad, write_grad, row_loss, n, c, width, kind,     \
                 smoothing, delta, grad_scale, nullptr, finish, partial, count, out, divisor);                 \
  }
FOR_FLOAT_TYPES(LOSS_KERNELS)

// 16-bit storage: float targets, row losses and scalars; loss_scale: one device float (S, or 1)
#define LOSS_LOW_KERNELS(T, S)                                                                                 \
  extern "C" __global__ void loss_rows_##S(const T* x, const int* labels, const float* targets,               \
                                            const long long* perm, const long long* start, int windowed,       \
                                            T* grad, int write_grad, float* row_loss, int n, int c, int width, \
                                            int kind, float smoothing, float delta, float grad_scale,          \
                                            const float* loss_scale, int finish, float* partial,               \
                                            unsigned int* count, float* out, float divisor) {                  \
    loss_rows<T>(x, labels, targets, perm, start, windowed, grad, write_grad, row_loss, n, c, width, kind,     \
                 smoothing, delta, grad_scale, loss_scale, finish, partial, count, out, divisor);              \
  }
FOR_LOW_TYPES(LOSS_LOW_KERNELS)
