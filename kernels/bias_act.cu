// bias_act.cu: the elementwise halves of a dense layer.
//   bias_act_forward:  z <- z + b (broadcast over rows), a = f(z)
//   act_backward:      out = d * f'(saved)
// Row-major (n_rows, n_cols) buffers, viewed flat as total = n_rows * n_cols elements.
#include "common.cuh"
#include "activations.cuh"

// z: (n_rows, n_cols), the GEMM result x W, updated in place to x W + b unless a is z;
// b: (n_cols,); a: (n_rows, n_cols) gets f(x W + b); a == z when f' does not need z.
template <typename T>
__device__ void bias_act_forward(T* z, const T* b, T* a, long long total, int n_cols, int kind, T alpha) {
  const bool keep_z = a != z;
  GRID_STRIDE_LOOP(i, total) {
    T v = z[i] + b[i % n_cols];
    if (keep_z) z[i] = v;
    a[i] = act_forward(kind, v, alpha);
  }
}

// d, saved, out: total elements; out may be d. saved is y or z (see activations.cuh).
template <typename T>
__device__ void act_backward(const T* d, const T* saved, T* out, long long total, int kind, T alpha) {
  GRID_STRIDE_LOOP(i, total) { out[i] = d[i] * act_grad(kind, saved[i], alpha); }
}

#define BIAS_ACT_KERNELS(T, S)                                                                                  \
  extern "C" __global__ void bias_act_forward_##S(T* z, const T* b, T* a, long long total, int n_cols, int kind, \
                                                   T alpha) {                                                    \
    bias_act_forward<T>(z, b, a, total, n_cols, kind, alpha);                                                    \
  }                                                                                                              \
  extern "C" __global__ void act_backward_##S(const T* d, const T* saved, T* out, long long total, int kind,     \
                                               T alpha) {                                                        \
    act_backward<T>(d, saved, out, total, kind, alpha);                                                          \
  }
FOR_FLOAT_TYPES(BIAS_ACT_KERNELS)
