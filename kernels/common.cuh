// common.cuh: what every kernel file shares: index types, the accumulator type of
// each precision, the float-type instantiation list, and deterministic reductions.
#pragma once

// Each kernel is written once as a template and exported per precision as
// extern "C" NAME_f32 / NAME_f64, so the Python side finds it by a plain name.
#define FOR_FLOAT_TYPES(X) X(float, f32) X(double, f64)

// #pragma unroll on the GPU (a loop over a small fixed count, so that the arrays it
// indexes stay in registers); nothing on a host build
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define UNROLL _Pragma("unroll")
#define UNROLL_BY(n) _Pragma(PRAGMA_TEXT(unroll n))  // a runtime-bound loop, n passes at a time
#define PRAGMA_TEXT(x) #x
#else
#define UNROLL
#define UNROLL_BY(n)
#endif

// Value c of a 16-byte word (c a constant once its loop is unrolled): float4's x, y, z, w
// (layer.cu's four k of a row), double2's x, y (mlp.cu's resident weights' words)
__device__ __forceinline__ float word_part(const float4& w, int c) {
  return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w;
}
__device__ __forceinline__ double word_part(const double2& w, int c) { return c == 0 ? w.x : w.y; }

// sums of float run in float, of double in double, of int in long long
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<int> { typedef long long type; };

// inf and NaN without a math header (NVRTC has none)
template <typename T> __device__ __forceinline__ T inf_value();
template <> __device__ __forceinline__ float inf_value<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf_value<double>() { return __longlong_as_double(0x7ff0000000000000LL); }
template <typename T> __device__ __forceinline__ T nan_value();
template <> __device__ __forceinline__ float nan_value<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double nan_value<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// Grid-stride loop over [0, n): each thread visits i, i + stride, ...
// i % n, i >= 0, n > 0: in 32 bits where i fits them (a 64-bit remainder is a long
// software routine on the GPU, and elementwise kernels take one per element)
__device__ __forceinline__ int column_of(long long i, int n) {
  return i <= 0xFFFFFFFFLL ? (int)((unsigned int)i % (unsigned int)n) : (int)(i % n);
}

// i / n, the same way (the row of a row-major element i, n columns)
__device__ __forceinline__ long long row_of(long long i, int n) {
  return i <= 0xFFFFFFFFLL ? (long long)((unsigned int)i / (unsigned int)n) : i / n;
}

#define GRID_STRIDE_LOOP(i, n)                                              \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

// The same visits, ELEM_UNROLL at a time: a pass of the loop takes i0 + u * stride for
// u < ELEM_UNROLL (those below n), so that a kernel can issue all of their loads before
// any of their stores. One element at a time, each load waits for the previous element's
// store (an output may alias the inputs as far as the compiler knows): one load in flight
// per thread, about half the HBM's rate (narrow's bias_act_forward on an H100: 78 us a
// 262144 x 64 float32 layer, whose traffic is about 45 us). Each element's arithmetic is
// unchanged, so are its bits.
#define ELEM_UNROLL 4
#define GRID_STRIDE_UNROLLED(i0, stride, n)                                                                    \
  for (long long stride = (long long)gridDim.x * blockDim.x, i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
       i0 < (n); i0 += ELEM_UNROLL * stride)

// Sum of v over the block, in a fixed tree order (no atomics: the same inputs give
// the same bits on every run). blockDim.x must be a power of two <= 1024; `shared`
// holds blockDim.x values. The result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// Sum of values[0..n) (or of their squares) by one block, each thread striding the
// values, then block_sum: the order depends on n and blockDim alone. P: const A* or
// const volatile A* (the last block of a one-launch reduction reads other blocks' writes
// from L2, not L1).
template <typename A, typename P>
__device__ __forceinline__ A block_sum_of(P values, long long n, A* shared, bool square = false) {
  A s = A(0);
  for (long long i = threadIdx.x; i < n; i += blockDim.x) {
    const A v = A(values[i]);
    s += square ? v * v : v;
  }
  return block_sum(s, shared);
}

// One launch instead of two for a grid-wide reduction: every block writes its part to
// global memory, then every thread of every block calls last_block(count) (it holds
// __syncthreads); it returns true in every thread of the block that finished last, which
// may then read every block's part (through volatile loads: from L2, not a stale L1) and
// finish. Each thread fences its own writes before the block takes its ticket
// (atomicAdd), and the last block fences after drawing the last one: __threadfence is
// fence.sc.gpu (membar.gl), which this relies on (a weaker acq_rel fence would not do).
// The last block puts the counter back to 0 for the next launch. `count`: a zeroed
// unsigned int that no two launches running at once may share (the backend keeps one per
// name and grid; its launches run in order on one stream). Which block is last varies;
// what it computes must not depend on it.
__device__ __forceinline__ bool last_block(unsigned int* count) {
  __shared__ bool last;
  __threadfence();  // this thread's writes, visible device-wide before the ticket
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(count, 1u) == gridDim.x * gridDim.y - 1;
    if (last) {
      __threadfence();  // every other block's writes (fenced before their tickets), seen
      *count = 0u;
    }
  }
  __syncthreads();
  return last;
}

// ---- sum of a flat buffer, one launch: each block sums a grid-stride share into
// partial[blockIdx.x]; the block that finishes last (last_block) sums the partials in a
// fixed order (block_sum_of) and writes out[0] = total / divisor (a mean when divisor =
// N). The partials and that order depend on n and the grid alone: the same bits every run.
// Returns true in the block that finished (its thread 0 wrote out[0]; a caller may go on
// there, e.g. optim.cu's fused guard), false elsewhere. value(i): the i-th value (A).
template <typename A, typename R, typename V>
__device__ bool sum_all_of(V value, long long n, int square, A* partial, unsigned int* count, R* out, A divisor) {
  __shared__ A shared[1024];
  A s = A(0);
  GRID_STRIDE_LOOP(i, n) {
    A v = value(i);
    s += square ? v * v : v;
  }
  A total = block_sum(s, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
  if (!last_block(count)) return false;
  total = block_sum_of<A>((const volatile A*)partial, gridDim.x, shared);
  if (threadIdx.x == 0) out[0] = R(divisor == A(1) ? total : total / divisor);
  return true;
}

// the same over the values x[0..n)
template <typename T, typename A, typename R>
__device__ bool sum_all(const T* x, long long n, int square, A* partial, unsigned int* count, R* out, A divisor) {
  return sum_all_of<A, R>([=](long long i) { return A(x[i]); }, n, square, partial, count, out, divisor);
}

// A gradient left in shares (mlp.cu: one per block, shares (n_shares, n)): its element i,
// g[i] = sum_b shares[b n + i], b in order (the same bits wherever it is summed), written
// to g[i] and returned. SHARES_UNROLL shares' loads at a time, then their adds in order: as
// a plain loop, NVRTC kept 4 in flight, a load latency per 4 shares (tiny: 32 shares, 8
// latencies, now 2; narrow's fused MLP up to 512), with nothing else for the thread to do.
#define SHARES_UNROLL 16
template <typename T>
__device__ __forceinline__ T sum_of_shares(const T* shares, int n_shares, long long n, long long i, T* g) {
  T s = shares[i];
  for (int b = 1; b < n_shares; b += SHARES_UNROLL) {
    T v[SHARES_UNROLL];
    UNROLL for (int u = 0; u < SHARES_UNROLL; ++u) v[u] = b + u < n_shares ? shares[(long long)(b + u) * n + i] : T(0);
    UNROLL for (int u = 0; u < SHARES_UNROLL; ++u) if (b + u < n_shares) s += v[u];  // (s + 0 would turn -0 into +0)
  }
  g[i] = s;
  return s;
}

// Warp-level sum and max (all 32 lanes active), butterfly order: every lane gets the result.
// Sum (max) over each group of `width` lanes (a power of two <= 32; every lane of the warp
// takes part). Its butterfly is the 32-lane one's last levels, so a group's result is
// the bits a whole warp would give with the other lanes holding 0 (-inf).
template <typename A>
__device__ __forceinline__ A warp_sum(A v, int width = 32) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v, int width = 32) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    A o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (o > v || o != o) ? o : v;  // NaN wins, as in NumPy's max
  }
  return v;
}
