// precision.cuh: 16-bit storage types and their conversions to and from float, on bit
// patterns (integer ops only), as __host__ __device__ functions: the same code runs in
// the kernels and in the host build of tests/host_math.cpp, which checks it bit for bit
// against the NumPy reference (gpubp/precision.py). Our own types rather than
// cuda_bf16.h / cuda_fp16.h: NVRTC without the CUDA toolkit has no such headers.
//
// Math is done in float: a kernel loads a 16-bit value, widens it exactly (to_float),
// computes, and rounds the result once (from_float: round to nearest, ties to even).
// Integer bit operations are not touched by -ftz=true; a bf16 subnormal (< 2^-126)
// widens to a float32 subnormal, which the float arithmetic then reads as zero.
#pragma once

struct bf16_t {  // bfloat16: sign, 8 exponent bits, 7 mantissa bits (the high half of a float)
  unsigned short bits;
};
struct f16_t {  // IEEE binary16: sign, 5 exponent bits, 10 mantissa bits
  unsigned short bits;
};

__host__ __device__ __forceinline__ unsigned int float_bits(float x) {
#ifdef __CUDACC_RTC__
  return __float_as_uint(x);
#else
  unsigned int u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}

__host__ __device__ __forceinline__ float bits_float(unsigned int u) {
#ifdef __CUDACC_RTC__
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ---- bfloat16
// widen: the 16 bits become the high half of the float32 pattern (exact)
__host__ __device__ __forceinline__ float to_float(bf16_t h) { return bits_float((unsigned int)h.bits << 16); }

// round: add 0x7fff plus the lowest kept bit, keep the high half (ties to even; a carry
// steps the exponent, up to inf); NaN keeps its sign and gets the quiet bit
__host__ __device__ __forceinline__ bf16_t bf16_from_float(float x) {
  unsigned int u = float_bits(x);
  bf16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = (unsigned short)((u >> 16) | 0x0040u);
  } else {
    h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}

// ---- float16
// widen: rebias the exponent (15 -> 127); a subnormal half m 2^-24 is normalised
__host__ __device__ __forceinline__ float to_float(f16_t h) {
  unsigned int sign = (unsigned int)(h.bits & 0x8000u) << 16;
  unsigned int e = (h.bits >> 10) & 0x1fu;
  unsigned int m = h.bits & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m << 13));  // inf, NaN
  if (e == 0) {
    if (m == 0) return bits_float(sign);  // +-0
    e = 113;                              // m 2^-24 = 1.f 2^(e - 127) after the shifts below
    while ((m & 0x400u) == 0) {
      m <<= 1;
      --e;
    }
    return bits_float(sign | (e << 23) | ((m & 0x3ffu) << 13));
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// round to nearest even: |x| >= 65520 -> inf; [2^-14, 65520): drop 13 mantissa bits;
// below 2^-14: the subnormal half round(|x| / 2^-24) from the 24-bit significand
__host__ __device__ __forceinline__ f16_t f16_from_float(float x) {
  unsigned int u = float_bits(x);
  unsigned int sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  f16_t h;
  if (u > 0x7f800000u) {  // NaN: quiet, sign kept
    h.bits = (unsigned short)(sign | 0x7e00u);
  } else if (u >= 0x477ff000u) {  // >= 65520 (halfway from 65504 to 2^16): inf
    h.bits = (unsigned short)(sign | 0x7c00u);
  } else if (u >= 0x38800000u) {  // normal half: rebias (127 -> 15), drop 13 bits
    unsigned int r = (u - 0x38000000u) >> 13;
    unsigned int rem = u & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    h.bits = (unsigned short)(sign | r);
  } else if (u < 0x33000000u) {  // below 2^-25 (half the smallest subnormal): zero
    h.bits = (unsigned short)sign;
  } else {  // subnormal half: significand m (24 bits) times 2^(e - 126) in units of 2^-24
    unsigned int e = u >> 23;
    unsigned int m = (u & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - e;  // 14..24
    unsigned int r = m >> shift;
    unsigned int rem = m & ((1u << shift) - 1u);
    unsigned int half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // r = 0x400 is the smallest normal
    h.bits = (unsigned short)(sign | r);
  }
  return h;
}

// load/store by storage type: float and double pass through
__host__ __device__ __forceinline__ float load(bf16_t v) { return to_float(v); }
__host__ __device__ __forceinline__ float load(f16_t v) { return to_float(v); }
__host__ __device__ __forceinline__ float load(float v) { return v; }
__host__ __device__ __forceinline__ double load(double v) { return v; }

template <typename S> __host__ __device__ __forceinline__ S store_as(float v);
template <> __host__ __device__ __forceinline__ bf16_t store_as<bf16_t>(float v) { return bf16_from_float(v); }
template <> __host__ __device__ __forceinline__ f16_t store_as<f16_t>(float v) { return f16_from_float(v); }
template <> __host__ __device__ __forceinline__ float store_as<float>(float v) { return v; }

// the math type of a storage type: float for the 16-bit ones
template <typename S> struct Math { typedef S type; };
template <> struct Math<bf16_t> { typedef float type; };
template <> struct Math<f16_t> { typedef float type; };

template <typename S> __host__ __device__ __forceinline__ S store_math(typename Math<S>::type v) {
  return store_as<S>(v);
}
template <> __host__ __device__ __forceinline__ double store_math<double>(double v) { return v; }

// Each 16-bit kernel is exported as NAME_bf16 / NAME_f16
#define FOR_LOW_TYPES(X) X(bf16_t, bf16) X(f16_t, f16)
