// gather.cu: a batch's rows, read out of a resident split in the epoch's order (the step's
// gather, gpubp/step.py; numpy_ops.gather_windows is the reference):
//   xo[i, :] = xs[perm[start[0] + i], :],  yo[i, :] = ys[perm[start[0] + i], :]   i < n
// (a batch's features and its targets or labels, in one launch). A copy: the rows move as
// words of the kernel's type T (1, 2, 4, 8 or 16 bytes; the launcher takes the widest that
// divides both pairs' row bytes and all four addresses), so every T gives the same bytes.
// The pointers are bytes; wx, wy are the rows' widths in words. A word's row is i / wx in
// 32 bits where i fits (row_of: a 64-bit division per element made the gather 4x its copy
// time on an H100).
// Each thread takes ELEM_UNROLL words a pass (GRID_STRIDE_UNROLLED): their rows' places
// (perm's loads), then the words, then the stores. One 4-byte element a thread, as the
// elementwise kernel before, narrow's gather (262144 rows of 64 float32 features and 64
// targets) took 207 us on an H100 where its traffic (256 MiB) is about 85 us: one load in
// flight per thread, behind the load of its row's place.
// The step's gather for a bf16 or fp16 model (gather_windows_w4_bf16, _w4_f16) rounds x's
// float32 values to the model's 16-bit storage as it moves them (cast.cu's rounding): the
// bits of the gather and then the cast, in one pass that writes 2 bytes a value where the
// two wrote 4 and read them back. Its words are 4 bytes (a float32 value of x, a word of
// the targets or labels).
#include "common.cuh"
#include "precision.cuh"

// the word types: NVRTC knows uint4 (16 bytes, 16-byte aligned) as CUDA's vector type; the
// host build has tests/cuda_host.h's
#define FOR_WORD_TYPES(X) \
  X(unsigned char, w1) X(unsigned short, w2) X(unsigned int, w4) X(unsigned long long, w8) X(uint4, w16)

// x's word as xo holds it: a copy (XO = T), or a float32's bits rounded to 16 bits
template <typename XO, typename T> __device__ __forceinline__ XO x_word(T v) { return v; }
template <> __device__ __forceinline__ bf16_t x_word<bf16_t, unsigned int>(unsigned int v) {
  return bf16_from_float(bits_float(v));
}
template <> __device__ __forceinline__ f16_t x_word<f16_t, unsigned int>(unsigned int v) {
  return f16_from_float(bits_float(v));
}

template <typename T, typename XO>
__device__ void gather_windows(const T* xs, const T* ys, const long long* perm, const long long* start, long long n,
                               int wx, int wy, XO* xo, T* yo) {
  const long long nx = n * wx, total = nx + n * wy, first = start[0];
  GRID_STRIDE_UNROLLED(i0, stride, total) {
    long long from[ELEM_UNROLL];  // the word's place in xs (i < nx) or ys; -1: past the end
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride, j = i < nx ? i : i - nx;
      const int w = i < nx ? wx : wy;
      from[u] = -1LL;
      if (i < total) {
        const long long q = row_of(j, w);  // the batch row
        from[u] = perm[first + q] * w + (j - q * w);
      }
    }
    T v[ELEM_UNROLL];
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) v[u] = from[u] >= 0 ? (i0 + u * stride < nx ? xs : ys)[from[u]] : T();
    UNROLL for (int u = 0; u < ELEM_UNROLL; ++u) {
      const long long i = i0 + u * stride;
      if (i >= total) break;
      if (i < nx)
        xo[i] = x_word<XO, T>(v[u]);
      else
        yo[i - nx] = v[u];
    }
  }
}

// T: the word type, S: the name suffix (w1 .. w16)
#define GATHER_KERNELS(T, S)                                                                                     \
  extern "C" __global__ void gather_windows_##S(const unsigned char* xs, const unsigned char* ys,               \
                                                 const long long* perm, const long long* start, long long n,  \
                                                 int wx, int wy, unsigned char* xo, unsigned char* yo) {       \
    gather_windows<T, T>((const T*)xs, (const T*)ys, perm, start, n, wx, wy, (T*)xo, (T*)yo);                   \
  }
FOR_WORD_TYPES(GATHER_KERNELS)

// xs float32, rounded into xo of the 16-bit storage T (S: bf16, f16); ys, yo 4-byte words
#define GATHER_ROUNDED_KERNELS(T, S)                                                                             \
  extern "C" __global__ void gather_windows_w4_##S(const unsigned char* xs, const unsigned char* ys,            \
                                                    const long long* perm, const long long* start, long long n, \
                                                    int wx, int wy, unsigned char* xo, unsigned char* yo) {      \
    gather_windows<unsigned int, T>((const unsigned int*)xs, (const unsigned int*)ys, perm, start, n, wx, wy,   \
                                    (T*)xo, (unsigned int*)yo);                                                  \
  }
FOR_LOW_TYPES(GATHER_ROUNDED_KERNELS)
