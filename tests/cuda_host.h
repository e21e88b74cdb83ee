// cuda_host.h: just enough of CUDA to run our kernels (kernels/*.cu) on the host, so the
// CPU tests can check what a GPU runs, block and warp logic included
// (tests/test_kernels_emulated.py). Included before a kernel file, built with g++.
//
// A launch runs the grid's blocks one after another, in a shuffled order (the block that
// finishes last then differs from run to run, as on a GPU), each block on blockDim host
// threads (one per CUDA thread):
//   __syncthreads        a barrier of the block's threads
//   __shfl_xor_sync      lanes exchange through a per-warp slot array between two
//                        barriers of the warp's 32 threads (all lanes must take part, as
//                        the full mask says); warp_all_words (host only) the same way
//   __shared__           static storage: one block runs at a time, so it is that block's
//   extern __shared__    (dynamic shared memory) host_dynamic_shared, HOST_DYNAMIC_SHARED_BYTES
//                        of it, the same way; a kernel names it through its own macro
//   __threadfence        a sequentially consistent fence; atomicAdd a real atomic
// A barrier that waits for more than BARRIER_SECONDS (threads that never arrive: a
// __syncthreads or a shuffle not reached by all) breaks: every wait returns from then on
// and the launch reports it, instead of hanging the test.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))  // as CUDA defines it

using std::exp;
using std::expm1;
using std::fabs;
using std::isfinite;
using std::log;
using std::log1p;
using std::sqrt;
using std::tanh;
using std::erf;
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }  // CUDA's device min and max
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// the dynamic shared memory of the running block (the launcher's size is at most this: its
// backend checks, tests/kernel_params.py)
#define HOST_DYNAMIC_SHARED_BYTES (256 * 1024)
alignas(16) inline unsigned char host_dynamic_shared[HOST_DYNAMIC_SHARED_BYTES];

// CUDA's 16-byte vector types (gather.cu's widest word; layer.cu's four k of a row; mlp.cu's
// resident weights' words)
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#ifndef BARRIER_SECONDS
#define BARRIER_SECONDS 10.0
#endif

class Barrier {  // reusable, with a timeout that breaks it for good
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (broken_) return;
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::duration<double>(BARRIER_SECONDS),
                      [&] { return gen_ != gen || broken_; })) {
      broken_ = true;
      cv_.notify_all();
    }
  }
  bool broken() {
    std::lock_guard<std::mutex> lock(m_);
    return broken_;
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
  bool broken_ = false;
};

struct BlockRun {  // what the threads of the running block share
  Barrier* block;
  std::vector<Barrier*> warps;
  std::vector<unsigned long long> slots;  // 32 per warp: one shuffle value per lane
  std::vector<unsigned> words;            // 32 x WARP_WORDS per warp: warp_all_words
};
inline BlockRun* g_run = nullptr;

inline int linear_thread() { return threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y; }

inline void __syncthreads() { g_run->block->wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves at most 8 bytes");
  const int t = linear_thread(), warp = t / 32, lane = t % 32;
  unsigned long long* slot = &g_run->slots[32 * warp];
  std::memcpy(&slot[lane], &v, sizeof(T));
  g_run->warps[warp]->wait();
  T out;
  std::memcpy(&out, &slot[lane ^ offset], sizeof(T));
  g_run->warps[warp]->wait();  // nobody overwrites a slot before every lane has read
  return out;
}

// Host only: all[l * count + i] = lane l's mine[i] for every lane l of the warp, i < count
// (<= WARP_WORDS), in one exchange (layer_tc.cu's host mma: the warp's fragments, where a
// shuffle a word would take 48 warp barriers an mma)
#define WARP_WORDS 8
inline void warp_all_words(const unsigned* mine, int count, unsigned* all) {
  const int t = linear_thread(), warp = t / 32, lane = t % 32;
  unsigned* slot = &g_run->words[32 * WARP_WORDS * warp];
  std::memcpy(&slot[lane * count], mine, count * sizeof(unsigned));
  g_run->warps[warp]->wait();
  std::memcpy(all, slot, 32 * count * sizeof(unsigned));
  g_run->warps[warp]->wait();
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }

// Run kernel() on grid x block threads: blocks in an order shuffled by `seed`, one after
// another, on one set of block.x * block.y * block.z host threads (each its threadIdx;
// a barrier of them all between blocks). Returns 0, or 1 when a barrier broke (a thread
// never reached it).
template <typename F>
int launch(dim3 grid, dim3 block, unsigned seed, F kernel) {
  gridDim = grid;
  blockDim = block;
  const int n = block.x * block.y * block.z, n_warps = (n + 31) / 32;
  std::vector<unsigned> order(grid.x * grid.y * grid.z);
  for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  Barrier bar(n), done(n);
  std::deque<Barrier> warp_bars;  // (a deque: a barrier holds a mutex and cannot move)
  BlockRun run{&bar, {}, std::vector<unsigned long long>(32 * n_warps), std::vector<unsigned>(32 * WARP_WORDS * n_warps)};
  for (int w = 0; w < n_warps; ++w) {
    warp_bars.emplace_back(std::min(32, n - 32 * w));
    run.warps.push_back(&warp_bars.back());
  }
  g_run = &run;
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned b : order) {
        blockIdx = dim3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
        kernel();
        done.wait();  // the block's static (__shared__) storage is the next block's only after this
      }
    });
  }
  for (auto& th : threads) th.join();
  g_run = nullptr;
  bool broke = bar.broken() || done.broken();
  for (auto& w : warp_bars) broke = broke || w.broken();
  return broke ? 1 : 0;
}
