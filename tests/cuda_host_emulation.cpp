// Runs the CUDA kernels of csrc/cuda/smoothed_xent_kernel.cu on the CPU, so that machines
// without a GPU (this project's CI) test their arithmetic and indexing, not only that they
// compile: a block's threads are std::threads, __syncthreads() and warp shuffles are
// barriers, and blocks run one after another. What this cannot show is a race between
// blocks or anything about speed; the GPU tests (marked `gpu`) cover those on a GPU.
//
// Built by tests/test_native.py with the host C++ compiler and the CUDA toolkit's headers,
// and called through ctypes with host pointers.
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace emulation {

thread_local uint3 thread_index;
thread_local uint3 block_index;
dim3 block_dim;
std::barrier<>* block_barrier = nullptr;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
alignas(16) unsigned char lanes[1024][16];  // one shuffle slot per thread of the block

template <typename T>
T shuffle_xor(T value, int offset) {
  const unsigned self = thread_index.x;
  std::barrier<>& warp = *warp_barriers[self / 32];
  std::memcpy(lanes[self], &value, sizeof(T));
  warp.arrive_and_wait();
  T other;
  std::memcpy(&other, lanes[self ^ static_cast<unsigned>(offset)], sizeof(T));
  warp.arrive_and_wait();  // nobody overwrites a slot before its reader is done
  return other;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned blocks, unsigned threads, Args... args) {
  block_dim = dim3(threads);
  for (unsigned b = 0; b < blocks; ++b) {
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> team;
    team.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      team.emplace_back([=] {
        thread_index = make_uint3(t, 0, 0);
        block_index = make_uint3(b, 0, 0);
        kernel(args...);
      });
    }
    for (std::thread& thread : team) thread.join();
  }
}

}  // namespace emulation

#define threadIdx emulation::thread_index
#define blockIdx emulation::block_index
#define blockDim emulation::block_dim
#define __syncthreads() emulation::block_barrier->arrive_and_wait()
#define __shfl_xor_sync(mask, value, offset) emulation::shuffle_xor(value, offset)
#undef __shared__
#define __shared__ static  // one block at a time: a static is the block's shared memory
#define FUSED_LS_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) \
  emulation::launch(kernel, blocks, threads, __VA_ARGS__)
#define cudaGetLastError() cudaSuccess
#define __launch_bounds__(...)

#include "../csrc/cuda/smoothed_xent_kernel.cu"

extern "C" int fused_ls_emulated_cuda_rows(const fused_ls::RowsProblem* problem, int blocks_per_row,
                                           void* workspace) {
  return static_cast<int>(fused_ls::cuda::launch_smoothed_xent_rows(*problem, blocks_per_row, workspace, nullptr));
}

extern "C" unsigned long fused_ls_emulated_workspace_bytes(const fused_ls::RowsProblem* problem, int blocks_per_row) {
  return fused_ls::cuda::workspace_bytes(*problem, blocks_per_row);
}
