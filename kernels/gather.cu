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
#include "common.cuh"

// the word types: NVRTC knows uint4 (16 bytes, 16-byte aligned) as CUDA's vector type; the
// host build has tests/cuda_host.h's
#define FOR_WORD_TYPES(X) \
  X(unsigned char, w1) X(unsigned short, w2) X(unsigned int, w4) X(unsigned long long, w8) X(uint4, w16)

template <typename T>
__device__ void gather_windows(const T* xs, const T* ys, const long long* perm, const long long* start, long long n,
                               int wx, int wy, T* xo, T* yo) {
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
        xo[i] = v[u];
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
    gather_windows<T>((const T*)xs, (const T*)ys, perm, start, n, wx, wy, (T*)xo, (T*)yo);                      \
  }
FOR_WORD_TYPES(GATHER_KERNELS)
