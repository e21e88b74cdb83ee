// activations.cuh: every activation's forward f(z) and local gradient f'(.), as
// __host__ __device__ functions. The single source of truth for the math on the GPU;
// tests compile this same file with g++ (the CUDA qualifiers defined away) and check
// it against the NumPy reference (gpubp/backend/numpy_ops.py) on the CPU.
//
// Which argument f' takes ("saved") follows gpubp/activations.py: the output y for
// relu, leaky_relu, elu, tanh, sigmoid, softplus; the pre-activation z for gelu,
// gelu_tanh, silu; nothing for identity. The backward pass is D' = D * act_grad(saved),
// a plain product, so that a NaN or inf in D propagates exactly as in NumPy.
#pragma once

#ifndef __CUDACC_RTC__
#include <math.h>  // host build; NVRTC has the math functions built in
#endif

// kind ids: the ACT_* values are ActivationInfo.kernel_id in gpubp/activations.py
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_LEAKY_RELU 2
#define ACT_ELU 3
#define ACT_GELU 4
#define ACT_GELU_TANH 5
#define ACT_SILU 6
#define ACT_TANH 7
#define ACT_SIGMOID 8
#define ACT_SOFTPLUS 9

// math by precision: float calls the f-suffixed functions, double the plain ones
__host__ __device__ __forceinline__ float m_exp(float x) { return expf(x); }
__host__ __device__ __forceinline__ double m_exp(double x) { return exp(x); }
__host__ __device__ __forceinline__ float m_expm1(float x) { return expm1f(x); }
__host__ __device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__host__ __device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__host__ __device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__host__ __device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__host__ __device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__host__ __device__ __forceinline__ float m_erf(float x) { return erff(x); }
__host__ __device__ __forceinline__ double m_erf(double x) { return erf(x); }
__host__ __device__ __forceinline__ float m_fabs(float x) { return fabsf(x); }
__host__ __device__ __forceinline__ double m_fabs(double x) { return fabs(x); }
__host__ __device__ __forceinline__ float m_log(float x) { return logf(x); }
__host__ __device__ __forceinline__ double m_log(double x) { return log(x); }

#define GELU_SQRT_2_OVER_PI 0.7978845608028654  // sqrt(2 / pi), gelu_tanh's c
#define GELU_TANH_K 0.044715
#define INV_SQRT_2 0.7071067811865476            // 1 / sqrt(2)
#define INV_SQRT_2PI 0.3989422804014327          // 1 / sqrt(2 pi)

// sigmoid(z) = 1 / (1 + exp(-z)) for z >= 0, exp(z) / (1 + exp(z)) for z < 0:
// only exp(-|z|) is ever formed, so nothing overflows
template <typename T>
__host__ __device__ __forceinline__ T sigmoid(T z) {
  T e = m_exp(-m_fabs(z));
  return (z >= T(0) ? T(1) : e) / (T(1) + e);
}

// Phi(z) = (1 + erf(z / sqrt(2))) / 2, the standard normal CDF
template <typename T>
__host__ __device__ __forceinline__ T normal_cdf(T z) {
  return T(0.5) * (T(1) + m_erf(z * T(INV_SQRT_2)));
}

// y = f(z); alpha is leaky_relu's negative slope (>= 0)
template <typename T>
__host__ __device__ __forceinline__ T act_forward(int kind, T z, T alpha) {
  switch (kind) {
    case ACT_RELU:  // max(z, 0), NaN passed through
      return z <= T(0) ? T(0) : z;
    case ACT_LEAKY_RELU:  // z if z > 0 else alpha z
      return z > T(0) ? z : alpha * z;
    case ACT_ELU:  // z if z > 0 else exp(z) - 1
      return z > T(0) ? z : m_expm1(z);
    case ACT_GELU:  // z Phi(z)
      return z * normal_cdf(z);
    case ACT_GELU_TANH:  // z/2 (1 + tanh(c (z + k z^3)))
      return T(0.5) * z * (T(1) + m_tanh(T(GELU_SQRT_2_OVER_PI) * (z + T(GELU_TANH_K) * z * z * z)));
    case ACT_SILU:  // z sigmoid(z)
      return z * sigmoid(z);
    case ACT_TANH:
      return m_tanh(z);
    case ACT_SIGMOID:
      return sigmoid(z);
    case ACT_SOFTPLUS:  // log(1 + exp(z)) = max(z, 0) + log(1 + exp(-|z|))
      return (z > T(0) ? z : T(0)) + m_log1p(m_exp(-m_fabs(z)));
    default:  // ACT_IDENTITY
      return z;
  }
}

// f'(.) from what the forward pass saved (see the table at the top)
template <typename T>
__host__ __device__ __forceinline__ T act_grad(int kind, T saved, T alpha) {
  switch (kind) {
    case ACT_RELU:  // f'(y) = [y > 0]
      return saved > T(0) ? T(1) : T(0);
    case ACT_LEAKY_RELU:  // f'(y) = 1 if y > 0 else alpha
      return saved > T(0) ? T(1) : alpha;
    case ACT_ELU:  // f'(y) = 1 if y > 0 else y + 1
      return saved > T(0) ? T(1) : saved + T(1);
    case ACT_GELU: {  // f'(z) = Phi(z) + z phi(z)
      T z = saved;
      return normal_cdf(z) + z * m_exp(T(-0.5) * z * z) * T(INV_SQRT_2PI);
    }
    case ACT_GELU_TANH: {  // t = tanh(c (z + k z^3)); f' = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 k z^2)
      T z = saved;
      T t = m_tanh(T(GELU_SQRT_2_OVER_PI) * (z + T(GELU_TANH_K) * z * z * z));
      return T(0.5) * (T(1) + t) +
             T(0.5) * z * (T(1) - t * t) * T(GELU_SQRT_2_OVER_PI) * (T(1) + T(3 * GELU_TANH_K) * z * z);
    }
    case ACT_SILU: {  // s = sigmoid(z); f' = s (1 + z (1 - s))
      T z = saved;
      T s = sigmoid(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case ACT_TANH:  // f'(y) = 1 - y^2
      return T(1) - saved * saved;
    case ACT_SIGMOID:  // f'(y) = y (1 - y)
      return saved * (T(1) - saved);
    case ACT_SOFTPLUS:  // f'(y) = 1 - exp(-y) = sigmoid(z)
      return -m_expm1(-saved);
    default:  // ACT_IDENTITY: f' = 1
      return T(1);
  }
}
