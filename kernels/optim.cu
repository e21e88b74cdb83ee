// optim.cu: one fused update per optimizer over the flat parameter, gradient and state
// buffers (torch.optim's single-tensor rules; see gpubp/backend/numpy_ops.py).
// grad_scale points to one device value (gradient clipping computes it on the device);
// skip points to one flag: when it is set the update changes nothing (a non-finite step).
#include "common.cuh"

// d = s g + wd p; buf = d (first step) or mu buf + (1 - damp) d; d = d + mu buf (nesterov)
// or buf; p = p - lr d
template <typename T>
__device__ void sgd_step(T* p, const T* g, T* buf, long long n, T lr, T momentum, T one_minus_dampening,
                         int nesterov, T weight_decay, int first_step, const T* grad_scale,
                         const bool* skip) {
  if (skip[0]) return;
  const T s = grad_scale[0];
  GRID_STRIDE_LOOP(i, n) {
    T d = g[i] * s;
    if (weight_decay != T(0)) d += weight_decay * p[i];
    if (momentum != T(0)) {
      T b = first_step ? d : buf[i] * momentum + one_minus_dampening * d;
      buf[i] = b;
      d = nesterov ? d + momentum * b : b;
    }
    p[i] -= lr * d;
  }
}

// d = s g (+ wd p, Adam) ; p = p decay, decay = 1 - lr wd (AdamW)
// m = m + (1 - b1) (d - m); v = b2 v + (1 - b2) d^2
// p = p - step_size m / (sqrt(v) / bias2_sqrt + eps), step_size = lr / (1 - b1^t), bias2_sqrt = sqrt(1 - b2^t)
// (the host computes decay, step_size and bias2_sqrt in double, as the reference does)
template <typename T>
__device__ void adam_step(T* p, const T* g, T* m, T* v, long long n, T one_minus_beta1, T beta2,
                          T one_minus_beta2, T eps, T weight_decay, int decoupled, T decay, T step_size,
                          T bias2_sqrt, const T* grad_scale, const bool* skip) {
  if (skip[0]) return;
  const T s = grad_scale[0];
  GRID_STRIDE_LOOP(i, n) {
    T d = g[i] * s;
    T pi = p[i];
    if (weight_decay != T(0)) {
      if (decoupled)
        pi *= decay;
      else
        d += weight_decay * pi;
    }
    T mi = m[i] + one_minus_beta1 * (d - m[i]);
    T vi = v[i] * beta2 + one_minus_beta2 * d * d;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step_size * mi / (sqrt(vi) / bias2_sqrt + eps);
  }
}

// The verdict on one step, one thread (it replaces a dozen tiny array ops). `step` points to
// the step index on the device (the trainer's counter: a captured step reads it when it runs).
// first_bad = step if it is -1 and loss or grad_sq is not finite; skip = first_bad >= 0;
// norm = sqrt(grad_sq); scale = min(1, max_norm / (norm + 1e-6)) if max_norm > 0, else 1
// One model's verdict (`frozen`: a stacked model that stopped; skipped as after divergence).
template <typename T>
__device__ __forceinline__ void guard_verdict(T loss, T grad_sq, long long step, T max_norm, bool frozen,
                                              long long* first_bad, bool* skip, T* norm, T* scale) {
  if (*first_bad == -1 && !(isfinite(loss) && isfinite(grad_sq))) *first_bad = step;
  *skip = *first_bad >= 0 || frozen;
  const T r = sqrt(grad_sq);
  *norm = r;
  if (max_norm > T(0)) {
    const T s = max_norm / (r + T(1e-6));
    *scale = s < T(1) ? s : T(1);  // min(1, s); a NaN s gives 1, as Python's min (the step is skipped)
  } else {
    *scale = T(1);
  }
}

// out = table[row], a row of a per-step table (gpubp/step.py) as its bytes (0: no table), a
// byte a thread of the block: the row's loads in flight together (one thread's byte loop
// would wait a load latency per byte, its stores possibly aliasing its next load)
__device__ __forceinline__ void select_row_block(const unsigned char* table, unsigned char* out, int row_bytes,
                                                 long long row) {
  for (int b = threadIdx.x; b < row_bytes; b += blockDim.x) out[b] = table[row * row_bytes + b];
}

// The step's last op (numpy_ops.step_advance), one block: running[i] += loss[i] (the m
// models' float64 sums), pos += 1, then each ahead table's row at the new pos where the
// tables have it (what the next step reads first: it needs no select of its own)
template <typename T>
__device__ void step_advance(const T* loss, double* running, long long m, long long* pos, const unsigned char* a,
                             unsigned char* a_out, int a_bytes, const unsigned char* b, unsigned char* b_out,
                             int b_bytes, const unsigned char* c, unsigned char* c_out, int c_bytes,
                             long long rows) {
  for (long long i = threadIdx.x; i < m; i += blockDim.x) running[i] += (double)loss[i];
  const long long p = pos[0] + 1;
  __syncthreads();  // every thread has read pos before thread 0 moves it
  if (threadIdx.x == 0) pos[0] = p;
  if (p < rows) {
    select_row_block(a, a_out, a_bytes, p);
    select_row_block(b, b_out, b_bytes, p);
    select_row_block(c, c_out, c_bytes, p);
  }
}

template <typename T>
__device__ void step_guard(const T* loss, const T* grad_sq, const long long* step, T max_norm, long long* first_bad,
                           bool* skip, T* norm, T* scale) {
  if (threadIdx.x != 0) return;  // one thread (of the one block, or of the block that finished the norm)
  guard_verdict(loss[0], grad_sq[0], step[0], max_norm, false, first_bad, skip, norm, scale);
}

// M stacked models (a sweep), one block each (blockIdx.x = model i): the block sums row i
// of g (M, p) in a fixed order into grad_sq[i], then its thread 0 gives model i's verdict.
template <typename T>
__device__ void step_guard_norm_batched(const T* loss, const T* g, long long p, T* grad_sq, const long long* step,
                                        const T* max_norm, const bool* frozen, long long* first_bad, bool* skip,
                                        T* norm, T* scale) {
  __shared__ T shared[1024];
  const int i = blockIdx.x;
  const T total = block_sum_of<T>(g + (long long)i * p, p, shared, true);
  if (threadIdx.x != 0) return;
  grad_sq[i] = total;
  guard_verdict(loss[i], total, step[0], max_norm[i], frozen[i], first_bad + i, skip + i, norm + i, scale + i);
}

// This update's optimizer numbers from two device counters (fp16: the schedule follows the
// steps, Adam's bias corrections and SGD's first momentum step the updates taken). One block;
// its threads run over the m models, then thread 0 moves the counter (after every thread
// has read it). rates (K, 2, m), counts (K, 2, m): double, row-major.
//   lr = rates[pos][0][i], decay = rates[pos][1][i]          this step's (the host's doubles)
//   c1 = counts[u - t0][0][i] = 1 - b1^t, c2 = counts[u - t0][1][i] = sqrt(1 - b2^t), t = u + 1
//   bias_corrected (Adam): vectors = (T) {decay, lr / c1, c2}     else (SGD): vectors = (T) {lr}
//   first_step = u == 0;  updates = u + 1 unless skip
// lr / c1 is an IEEE double division (correctly rounded, as the host's), then one rounding
// to T (cvt.rn to float): the bits of the host's Python floats stored as T. (CuPy's -ftz=true
// would flush a float32 subnormal result, a rate below 2^-126, to zero; the host would keep it.)
// See numpy_ops.update_vectors, the reference.
template <typename T>
__device__ void update_vectors(const double* rates, const long long* pos, const double* counts, const long long* t0,
                               long long* updates, const bool* skip, long long m, int bias_corrected, T* vectors,
                               bool* first_step) {
  if (blockIdx.x != 0) return;
  const long long u = updates[0];
  const double* rate = rates + pos[0] * 2 * m;
  const double* count = counts + (u - t0[0]) * 2 * m;
  for (long long i = threadIdx.x; i < m; i += blockDim.x) {
    if (bias_corrected) {
      vectors[i] = (T)rate[m + i];
      vectors[m + i] = (T)(rate[i] / count[i]);
      vectors[2 * m + i] = (T)count[m + i];
    } else {
      vectors[i] = (T)rate[i];
    }
  }
  __syncthreads();  // every thread has read updates[0]
  if (threadIdx.x == 0) {
    first_step[0] = u == 0;
    if (!skip[0]) updates[0] = u + 1;
  }
}

#define OPTIM_KERNELS(T, S)                                                                                     \
  extern "C" __global__ void sgd_step_##S(T* p, const T* g, T* buf, long long n, T lr, T momentum,              \
                                           T one_minus_dampening, int nesterov, T weight_decay, int first_step, \
                                           const T* grad_scale, const bool* skip) {                             \
    sgd_step<T>(p, g, buf, n, lr, momentum, one_minus_dampening, nesterov, weight_decay, first_step,            \
                grad_scale, skip);                                                                               \
  }                                                                                                             \
  extern "C" __global__ void adam_step_##S(T* p, const T* g, T* m, T* v, long long n, T one_minus_beta1,       \
                                            T beta2, T one_minus_beta2, T eps, T weight_decay, int decoupled,   \
                                            T decay, T step_size, T bias2_sqrt, const T* grad_scale,            \
                                            const bool* skip) {                                                 \
    adam_step<T>(p, g, m, v, n, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decoupled, decay,   \
                 step_size, bias2_sqrt, grad_scale, skip);                                                      \
  }                                                                                                             \
  extern "C" __global__ void step_guard_##S(const T* loss, const T* grad_sq, const long long* step, T max_norm, \
                                             long long* first_bad, bool* skip, T* norm, T* scale) {             \
    step_guard<T>(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale);                                 \
  }                                                                                                             \
  /* grad_sq = sum g^2 (common.cuh's one-launch sum), then step_guard in the block that finished it; */        \
  /* shares not g itself: g is first summed from its shares (n_shares, n) (mlp.cu), g[i] written; */          \
  /* advance: that block ends the step's bookkeeping too (step_advance_selecting): the now rows */          \
  /* at pos (the update's numbers), running += loss, pos += 1, the ahead row at the new pos; the */          \
  /* rows a byte a thread, after the verdict has read the step index */                                       \
  extern "C" __global__ void step_guard_norm_##S(const T* loss, T* g, const T* shares, int n_shares, long long n,  \
                                                  T* partial, unsigned int* count, T* grad_sq,                  \
                                                  const long long* step, T max_norm, long long* first_bad,      \
                                                  bool* skip, T* norm, T* scale, int advance, double* running,  \
                                                  long long* pos, const unsigned char* now_a,                   \
                                                  unsigned char* now_a_out, int now_a_bytes,                    \
                                                  const unsigned char* now_b, unsigned char* now_b_out,         \
                                                  int now_b_bytes, const unsigned char* ahead,                  \
                                                  unsigned char* ahead_out, int ahead_bytes, long long ahead_rows) { \
    auto value = [=](long long i) { return shares != g ? sum_of_shares(shares, n_shares, n, i, g) : g[i]; };       \
    if (!sum_all_of<T, T>(value, n, 1, partial, count, grad_sq, T(1))) return;                                 \
    const long long p = advance ? pos[0] : 0; /* every thread, before thread 0 moves it */                     \
    step_guard<T>(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale); /* thread 0 */                \
    if (!advance) return;                                                                                       \
    __syncthreads(); /* the verdict has read the step index the ahead row overwrites */                        \
    select_row_block(now_a, now_a_out, now_a_bytes, p);                                                         \
    select_row_block(now_b, now_b_out, now_b_bytes, p);                                                         \
    if (p + 1 < ahead_rows) select_row_block(ahead, ahead_out, ahead_bytes, p + 1);                             \
    if (threadIdx.x == 0) {                                                                                     \
      running[0] += (double)loss[0];                                                                            \
      pos[0] = p + 1;                                                                                           \
    }                                                                                                           \
  }                                                                                                             \
  extern "C" __global__ void step_advance_##S(const T* loss, double* running, long long m, long long* pos,       \
                                               const unsigned char* a, unsigned char* a_out, int a_bytes,       \
                                               const unsigned char* b, unsigned char* b_out, int b_bytes,       \
                                               const unsigned char* c, unsigned char* c_out, int c_bytes,       \
                                               long long rows) {                                                \
    step_advance<T>(loss, running, m, pos, a, a_out, a_bytes, b, b_out, b_bytes, c, c_out, c_bytes, rows);      \
  }                                                                                                             \
  extern "C" __global__ void step_guard_norm_batched_##S(const T* loss, const T* g, long long p, T* grad_sq,      \
                                                          const long long* step, const T* max_norm,             \
                                                          const bool* frozen, long long* first_bad, bool* skip, \
                                                          T* norm, T* scale) {                                  \
    step_guard_norm_batched<T>(loss, g, p, grad_sq, step, max_norm, frozen, first_bad, skip, norm, scale);      \
  }                                                                                                             \
  extern "C" __global__ void update_vectors_##S(const double* rates, const long long* pos, const double* counts, \
                                                 const long long* t0, long long* updates, const bool* skip,     \
                                                 long long m, int bias_corrected, T* vectors, bool* first_step) { \
    update_vectors<T>(rates, pos, counts, t0, updates, skip, m, bias_corrected, vectors, first_step);           \
  }
FOR_FLOAT_TYPES(OPTIM_KERNELS)

// fp16's verdict with dynamic loss scaling (torch.cuda.amp.GradScaler's rule), one thread.
// The gradients are S g, S = loss_scale[0] (float), so grad_sq = S^2 |g|^2:
//   first_bad = step if it is -1 and the loss (float32, unscaled) is not finite: divergence
//   overflow = grad_sq not finite; skip = first_bad >= 0 or overflow (this step only)
//   norm = sqrt(grad_sq) / S;  scale = min(1, max_norm / (norm + 1e-6)) / S, or 1 / S
//   while first_bad == -1: overflow: S = S backoff, good_steps = 0, skipped += 1;
//   else good_steps += 1, and at `interval`: S = S growth (if finite), good_steps = 0
// See numpy_ops.step_guard_scaled, the reference.
// (one thread: of the one block, or of the block that finished the squared norm)
__device__ void step_guard_scaled(const float* loss, const float* grad_sq, const long long* step, float max_norm,
                                  long long* first_bad, bool* skip, float* norm, float* scale, float* loss_scale,
                                  long long* good_steps, long long* skipped, long long interval, float backoff,
                                  float growth) {
  if (threadIdx.x != 0) return;
  const float s = loss_scale[0];
  if (first_bad[0] == -1 && !isfinite(loss[0])) first_bad[0] = step[0];
  const bool overflow = !isfinite(grad_sq[0]);
  skip[0] = first_bad[0] >= 0 || overflow;
  const float r = sqrt(grad_sq[0]) / s;
  norm[0] = r;
  float clip = 1.0f;
  if (max_norm > 0.0f) {
    const float c = max_norm / (r + 1e-6f);
    clip = c < 1.0f ? c : 1.0f;
  }
  scale[0] = clip / s;
  if (first_bad[0] >= 0) return;
  if (overflow) {
    loss_scale[0] = s * backoff;
    good_steps[0] = 0;
    skipped[0] += 1;
  } else {
    const long long good = good_steps[0] + 1;
    if (good == interval) {
      const float grown = s * growth;
      if (isfinite(grown)) loss_scale[0] = grown;
      good_steps[0] = 0;
    } else {
      good_steps[0] = good;
    }
  }
}

extern "C" __global__ void step_guard_scaled_f32(const float* loss, const float* grad_sq, const long long* step,
                                                 float max_norm, long long* first_bad, bool* skip, float* norm,
                                                 float* scale, float* loss_scale, long long* good_steps,
                                                 long long* skipped, long long interval, float backoff,
                                                 float growth) {
  step_guard_scaled(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps, skipped,
                    interval, backoff, growth);
}

// grad_sq = sum g^2 (common.cuh's one-launch sum), then step_guard_scaled in the block that finished it
extern "C" __global__ void step_guard_scaled_norm_f32(const float* loss, const float* g, long long n,
                                                      float* partial, unsigned int* count, float* grad_sq,
                                                      const long long* step, float max_norm, long long* first_bad,
                                                      bool* skip, float* norm, float* scale, float* loss_scale,
                                                      long long* good_steps, long long* skipped, long long interval,
                                                      float backoff, float growth) {
  if (sum_all<float, float, float>(g, n, 1, partial, count, grad_sq, 1.0f))
    step_guard_scaled(loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps, skipped,
                      interval, backoff, growth);
}
