// bias_act.cu: the elementwise halves of a dense layer.
//   bias_act_forward:  z <- z + b (broadcast over rows), a = f(z)
//   act_backward:      out = d * f'(saved)
// Row-major (n_rows, n_cols) buffers, viewed flat as total = n_rows * n_cols elements.
// Storage S is float or double (math in S), or a 16-bit type (bf16_t, f16_t): each
// value is widened to float, the math runs in float, each result is rounded once;
// the bias stays float32 (the master parameters).
#include "common.cuh"
#include "precision.cuh"
#include "activations.cuh"

// z: (n_rows, n_cols), the GEMM result x W, updated in place to x W + b unless a is z;
// b: (n_cols,); a: (n_rows, n_cols) gets f(x W + b); a == z when f' does not need z.
template <typename S>
__device__ void bias_act_forward(S* z, const typename Math<S>::type* b, S* a, long long total, int n_cols, int kind,
                                 typename Math<S>::type alpha) {
  typedef typename Math<S>::type T;
  const bool keep_z = a != z;
  GRID_STRIDE_UNROLLED(i0, stride, total) {
    T v[ELEM_UNROLL];  // x W + b of the pass's elements: every load first
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride;
      v[u] = i < total ? load(z[i]) + b[column_of(i, n_cols)] : T(0);
    }
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride;
      if (i >= total) break;
      if (keep_z) z[i] = store_math<S>(v[u]);
      a[i] = store_math<S>(act_forward(kind, v[u], alpha));
    }
  }
}

// d, saved, out: total elements; out may be d. saved is y or z (see activations.cuh).
template <typename S>
__device__ void act_backward(const S* d, const S* saved, S* out, long long total, int kind,
                             typename Math<S>::type alpha) {
  typedef typename Math<S>::type T;
  GRID_STRIDE_UNROLLED(i0, stride, total) {
    T dv[ELEM_UNROLL], sv[ELEM_UNROLL];  // the pass's loads first (out may be d)
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride;
      dv[u] = i < total ? load(d[i]) : T(0);
      sv[u] = i < total ? load(saved[i]) : T(0);
    }
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride;
      if (i >= total) break;
      out[i] = store_math<S>(dv[u] * act_grad(kind, sv[u], alpha));
    }
  }
}

// T: the storage type, S: the name suffix (f32, f64, bf16, f16)
#define BIAS_ACT_KERNELS(T, S)                                                                                 \
  extern "C" __global__ void bias_act_forward_##S(T* z, const Math<T>::type* b, T* a, long long total,        \
                                                   int n_cols, int kind, Math<T>::type alpha) {               \
    bias_act_forward<T>(z, b, a, total, n_cols, kind, alpha);                                                  \
  }                                                                                                            \
  extern "C" __global__ void act_backward_##S(const T* d, const T* saved, T* out, long long total, int kind,   \
                                               Math<T>::type alpha) {                                          \
    act_backward<T>(d, saved, out, total, kind, alpha);                                                        \
  }
FOR_FLOAT_TYPES(BIAS_ACT_KERNELS)
FOR_LOW_TYPES(BIAS_ACT_KERNELS)
