// Launch helpers shared by the CUDA kernels: block size, grid sizing from the device's SM count, warp reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>

namespace flowgmm {
namespace cuda_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// blocks to keep every SM busy (several resident blocks per SM); the SM count is queried once per device
inline int64_t target_blocks() {
  static std::atomic<int> sm_count[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int n = dev < 64 ? sm_count[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev < 64) sm_count[dev].store(n, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(n) * 8;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column-tiled layout used by the per-sample kernels: x viewed as (B, N); block (i, j) owns columns
// [i * kThreads, (i + 1) * kThreads) and samples [j * rows, (j + 1) * rows). Returns {grid, rows}.
inline std::pair<dim3, int64_t> column_grid(int64_t B, int64_t N) {
  const int64_t col_blocks = std::max<int64_t>(1, ceil_div(N, kThreads));
  int64_t chunks = std::clamp<int64_t>(target_blocks() / col_blocks, 1, std::max<int64_t>(B, 1));
  int64_t rows = ceil_div(std::max<int64_t>(B, 1), chunks);
  chunks = ceil_div(std::max<int64_t>(B, 1), rows);
  while (chunks > 65535) {  // grid.y limit
    rows *= 2;
    chunks = ceil_div(B, rows);
  }
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks)), rows};
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda_detail
}  // namespace flowgmm
