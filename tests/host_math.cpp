// The kernels' __host__ __device__ math built for the host (g++ with the CUDA
// qualifiers defined away, see tests/test_kernels_cpu.py), exported for ctypes.
#include "activations.cuh"
#include "precision.cuh"

template <typename T>
static void forward(int kind, T alpha, const T* z, T* y, long n) {
  for (long i = 0; i < n; ++i) y[i] = act_forward<T>(kind, z[i], alpha);
}

template <typename T>
static void backward(int kind, T alpha, const T* d, const T* saved, T* out, long n) {
  // as act_backward in kernels/bias_act.cu: D' = D * f'(saved)
  for (long i = 0; i < n; ++i) out[i] = d[i] * act_grad<T>(kind, saved[i], alpha);
}

extern "C" {
void act_forward_f32(int kind, float alpha, const float* z, float* y, long n) { forward(kind, alpha, z, y, n); }
void act_forward_f64(int kind, double alpha, const double* z, double* y, long n) { forward(kind, alpha, z, y, n); }
void act_backward_f32(int kind, float alpha, const float* d, const float* s, float* out, long n) {
  backward(kind, alpha, d, s, out, n);
}
void act_backward_f64(int kind, double alpha, const double* d, const double* s, double* out, long n) {
  backward(kind, alpha, d, s, out, n);
}
}

// Mixed precision: precision.cuh's conversions (bit patterns in, bit patterns out), and
// an activation on 16-bit storage as bias_act.cu runs it: widen, float math, round once.
template <typename S>
static void forward_low(int kind, float alpha, const unsigned short* z, unsigned short* y, long n) {
  for (long i = 0; i < n; ++i) {
    S v;
    v.bits = z[i];
    const float b = 0.0f;  // as bias_act_forward: f(z + b), here with a zero bias (so -0 becomes +0)
    y[i] = store_as<S>(act_forward<float>(kind, load(v) + b, alpha)).bits;
  }
}

template <typename S>
static void backward_low(int kind, float alpha, const unsigned short* d, const unsigned short* s,
                         unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) {
    S dv, sv;
    dv.bits = d[i];
    sv.bits = s[i];
    out[i] = store_as<S>(load(dv) * act_grad<float>(kind, load(sv), alpha)).bits;
  }
}

extern "C" {
void round_bf16(const float* x, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = bf16_from_float(x[i]).bits;
}
void round_f16(const float* x, unsigned short* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = f16_from_float(x[i]).bits;
}
void widen_bf16(const unsigned short* h, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = load(bf16_t{h[i]});
}
void widen_f16(const unsigned short* h, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = load(f16_t{h[i]});
}
void act_forward_bf16(int kind, float alpha, const unsigned short* z, unsigned short* y, long n) {
  forward_low<bf16_t>(kind, alpha, z, y, n);
}
void act_forward_f16(int kind, float alpha, const unsigned short* z, unsigned short* y, long n) {
  forward_low<f16_t>(kind, alpha, z, y, n);
}
void act_backward_bf16(int kind, float alpha, const unsigned short* d, const unsigned short* s, unsigned short* out,
                       long n) {
  backward_low<bf16_t>(kind, alpha, d, s, out, n);
}
void act_backward_f16(int kind, float alpha, const unsigned short* d, const unsigned short* s, unsigned short* out,
                      long n) {
  backward_low<f16_t>(kind, alpha, d, s, out, n);
}
}

// The same float32 math with the CPU flushing subnormals as the GPU does under CuPy's
// -ftz=true: MXCSR FTZ (results) and DAZ (inputs), set for the call and restored after.
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
struct FlushDenormals {
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
};
extern "C" {
int has_ftz() { return 1; }
void act_forward_f32_ftz(int kind, float alpha, const float* z, float* y, long n) {
  FlushDenormals ftz;
  forward(kind, alpha, z, y, n);
}
void act_backward_f32_ftz(int kind, float alpha, const float* d, const float* s, float* out, long n) {
  FlushDenormals ftz;
  backward(kind, alpha, d, s, out, n);
}
}
#else
extern "C" int has_ftz() { return 0; }
#endif
