// cast.cu: mixed precision's conversions and the residual sum in 16 bits.
//   cast_<from>_<to>:  dst[i] = src[i] in the other storage type (to 16 bits: rounded
//                      to nearest even; to float: exact)
//   add_<bf16|f16>:    out[i] = round(a[i] + b[i]), the sum in float
// The conversions themselves are precision.cuh's, checked bit for bit on the host.
#include "common.cuh"
#include "precision.cuh"

template <typename From, typename To>
__device__ void cast(const From* src, To* dst, long long n) {
  GRID_STRIDE_LOOP(i, n) { dst[i] = store_as<To>(load(src[i])); }
}

template <typename S>
__device__ void add(const S* a, const S* b, S* out, long long n) {
  GRID_STRIDE_LOOP(i, n) { out[i] = store_as<S>(load(a[i]) + load(b[i])); }
}

#define CAST_KERNELS(T, S)                                                                                    \
  extern "C" __global__ void cast_f32_##S(const float* src, T* dst, long long n) { cast<float, T>(src, dst, n); } \
  extern "C" __global__ void cast_##S##_f32(const T* src, float* dst, long long n) { cast<T, float>(src, dst, n); } \
  extern "C" __global__ void add_##S(const T* a, const T* b, T* out, long long n) { add<T>(a, b, out, n); }
FOR_LOW_TYPES(CAST_KERNELS)
