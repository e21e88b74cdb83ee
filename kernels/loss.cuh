// loss.cuh: each loss of one row, value and gradient, by a group of a warp's lanes (loss.cu
// runs it over a batch's rows; mlp.cu, a whole warp a row, over its fused forward pass's).
// 16-bit storage (bf16_t, f16_t): x is widened to float and the loss computed in float;
// each gradient element is rounded once to 16 bits after the multiplication by fp16's loss
// scale S (a device value, loss_scale[0]; the value itself is never scaled).
#pragma once
#include "common.cuh"
#include "precision.cuh"
#include "activations.cuh"

// kind ids: LossInfo.kernel_id in gpubp/losses.py
#define LOSS_SOFTMAX_CROSS_ENTROPY 0
#define LOSS_BINARY_CROSS_ENTROPY 1
#define LOSS_MSE 2
#define LOSS_HUBER 3

#define LOSS_UNROLL 4  // columns a lane loads at once in an elementwise loss's row (loss_row)

// Softmax cross-entropy of one row, label y, smoothing e:
//   m = max_j x_j, lse = log sum_j exp(x_j - m), logp_j = (x_j - m) - lse
//   loss = -(1 - e) logp_y - (e / C) sum_j logp_j
//   grad_j = (exp(logp_j) - e / C - (1 - e) [j = y]) * grad_scale
// A label outside [0, C) makes the row's loss and gradient NaN (visible, not silent).
// One group of `width` lanes of a warp (see loss_row); returns the row's loss in each of them.
template <typename S, typename T>
__device__ T cross_entropy_row(const S* x, int y, S* grad, int c, T e, T grad_scale, const T* loss_scale,
                               int width) {
  const int lane = threadIdx.x % width;
  T m = -inf_value<T>();
  for (int j = lane; j < c; j += width) {
    T xj = load(x[j]);
    m = (xj > m || xj != xj) ? xj : m;
  }
  m = warp_max(m, width);
  T sum_exp = T(0);
  for (int j = lane; j < c; j += width) sum_exp += m_exp(load(x[j]) - m);
  const T lse = m_log(warp_sum(sum_exp, width));
  const bool valid = y >= 0 && y < c;
  T sum_logp = T(0);
  for (int j = lane; j < c; j += width) {
    T logp = (load(x[j]) - m) - lse;
    sum_logp += logp;
    if (grad != nullptr) {
      T g = m_exp(logp) - e / T(c);
      if (j == y) g -= T(1) - e;
      T gj = valid ? g * grad_scale : nan_value<T>();
      if (loss_scale != nullptr) gj *= loss_scale[0];
      grad[j] = store_math<S>(gj);
    }
  }
  sum_logp = warp_sum(sum_logp, width);
  const T nll = valid ? -((load(x[y]) - m) - lse) : nan_value<T>();
  return e != T(0) ? (T(1) - e) * nll - (e / T(c)) * sum_logp : nll;
}

// Elementwise losses of one row: l_j and dl_j/dx_j (before grad_scale)
template <typename T>
__device__ __forceinline__ T elementwise_loss(int kind, T x, T t, T delta, T* dl) {
  if (kind == LOSS_BINARY_CROSS_ENTROPY) {  // max(x, 0) - x t + log(1 + exp(-|x|)); sigmoid(x) - t
    *dl = sigmoid(x) - t;
    return (x > T(0) ? x : T(0)) - x * t + m_log1p(m_exp(-m_fabs(x)));
  }
  T r = x - t;
  if (kind == LOSS_MSE) {  // r^2; 2 r
    *dl = T(2) * r;
    return r * r;
  }
  // LOSS_HUBER: r^2/2 if |r| < delta else delta (|r| - delta/2); r or delta sign(r)
  T a = m_fabs(r);
  if (a < delta) {
    *dl = r;
    return T(0.5) * r * r;
  }
  *dl = r > T(0) ? delta : (r < T(0) ? -delta : r);  // r is NaN here when neither
  return delta * (a - T(0.5) * delta);
}

// One row's loss (returned in every lane of its group) and, unless grad is null, its
// gradient grad[j] = dl/dx_j grad_scale (times S = loss_scale[0] when given), rounded once
// to S. x, grad: the row's c values; label: its class (cross-entropy), else t: its c
// targets. A group of `width` lanes (a power of two <= 32; each warp holds 32 / width
// groups, all its lanes calling together) strides the columns; with width >= c the
// group's sums are the whole warp's bits (warp_sum), so a narrow row takes a group, not
// a warp. c = 0: no column is read (a group with no row, beside groups with rows).
template <typename S>
__device__ typename Math<S>::type loss_row(int kind, const S* x, int label, const typename Math<S>::type* t,
                                           S* grad, int c, typename Math<S>::type smoothing,
                                           typename Math<S>::type delta, typename Math<S>::type grad_scale,
                                           const typename Math<S>::type* loss_scale, int width = 32) {
  typedef typename Math<S>::type T;
  typedef typename Acc<T>::type A;
  if (kind == LOSS_SOFTMAX_CROSS_ENTROPY)
    return cross_entropy_row(x, label, grad, c, smoothing, grad_scale, loss_scale, width);
  A s = A(0);
  // LOSS_UNROLL of a lane's columns at a time: their loads first, all in flight together,
  // then their terms in column order (the order, so the bits, of one column at a time).
  // One at a time, each load waited for the last one's use: the store to grad between them
  // may alias x or t as far as the compiler knows, so it keeps every later load below it
  // (wide's 4096-column rows took 229 us a step in the loss on an H100, a third of that
  // would be its HBM traffic)
  for (int j0 = threadIdx.x % width; j0 < c; j0 += LOSS_UNROLL * width) {
    T xv[LOSS_UNROLL], tv[LOSS_UNROLL];
    UNROLL for (int u = 0; u < LOSS_UNROLL; ++u) {
      const int j = j0 + u * width;
      xv[u] = j < c ? load(x[j]) : T(0);
      tv[u] = j < c ? t[j] : T(0);
    }
    UNROLL for (int u = 0; u < LOSS_UNROLL; ++u) {
      const int j = j0 + u * width;
      if (j >= c) break;
      T dl;
      s += A(elementwise_loss(kind, xv[u], tv[u], delta, &dl));
      if (grad != nullptr) {
        T gj = dl * grad_scale;
        if (loss_scale != nullptr) gj *= loss_scale[0];
        grad[j] = store_math<S>(gj);
      }
    }
  }
  return T(warp_sum(s, width));
}
