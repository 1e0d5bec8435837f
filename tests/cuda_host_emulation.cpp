// Runs the CUDA kernels of csrc/cuda/smoothed_xent_kernel.cu on the CPU, so that machines
// without a GPU (this project's CI) test their arithmetic and indexing, not only that they
// compile: a block's threads are std::threads, __syncthreads() and warp shuffles are
// barriers, and blocks run one after another. What this cannot show is a race between
// blocks or anything about speed; the GPU tests (marked `gpu`) cover those on a GPU.
//
// Built by tests/test_native.py with the host C++ compiler and the CUDA toolkit's headers,
// and called through ctypes with host pointers.
//
// Every load and store of a row's logits or gradient is counted here by its width, and one
// not aligned to its width is counted apart (tests/test_cuda_kernel_layouts.py reads both:
// the 16-byte path is taken for every layout, and never at an address a GPU would refuse).
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
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

// [load, store][log2 of the width in bytes: 1 to 16]; and accesses not aligned to their width.
std::atomic<unsigned long long> row_accesses[2][5];
std::atomic<unsigned long long> misaligned_row_accesses;

inline void row_access(bool is_store, const void* ptr, unsigned bytes) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0) ++misaligned_row_accesses;
  ++row_accesses[is_store ? 1 : 0][std::countr_zero(bytes)];
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
#define FUSED_LS_ROW_ACCESS(is_store, ptr, bytes) emulation::row_access(is_store, ptr, bytes)

#include "../csrc/cuda/smoothed_xent_kernel.cu"

extern "C" int fused_ls_emulated_cuda_rows(const fused_ls::RowsProblem* problem, int blocks_per_row,
                                           void* workspace) {
  return static_cast<int>(fused_ls::cuda::launch_smoothed_xent_rows(*problem, blocks_per_row, workspace, nullptr));
}

extern "C" unsigned long fused_ls_emulated_workspace_bytes(const fused_ls::RowsProblem* problem, int blocks_per_row) {
  return fused_ls::cuda::workspace_bytes(*problem, blocks_per_row);
}

// The counts since the last call, then zeroed: out[0..4] loads of 1, 2, 4, 8 and 16 bytes,
// out[5..9] stores of those widths, out[10] accesses not aligned to their width.
extern "C" void fused_ls_emulated_take_row_accesses(unsigned long long* out) {
  for (int kind = 0; kind < 2; ++kind) {
    for (int width = 0; width < 5; ++width) out[kind * 5 + width] = emulation::row_accesses[kind][width].exchange(0);
  }
  out[10] = emulation::misaligned_row_accesses.exchange(0);
}

extern "C" int fused_ls_emulated_slice_statistics(const fused_ls::SliceProblem* problem) {
  return static_cast<int>(fused_ls::cuda::launch_slice_statistics(*problem, nullptr));
}

extern "C" int fused_ls_emulated_slice_gradient(const fused_ls::SliceProblem* problem) {
  return static_cast<int>(fused_ls::cuda::launch_slice_gradient(*problem, nullptr));
}
