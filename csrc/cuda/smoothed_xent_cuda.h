// The raw-pointer CUDA launcher of the fused op. No torch headers: smoothed_xent_kernel.cu
// compiles with a bare `nvcc -c`, which is how CI checks it on machines whose torch has no
// CUDA; smoothed_xent_cuda.cpp is the torch side.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../smoothed_xent.h"

namespace fused_ls::cuda {

// Thread blocks per row: 1, unless so few rows are this long that most SMs would idle.
int blocks_per_row(int64_t num_rows, int64_t num_classes, int num_sms);

// Bytes of device scratch launch_smoothed_xent_rows needs (0 for one block per row).
size_t workspace_bytes(const RowsProblem& problem, int blocks_per_row);

// Launches on `stream` and returns the first launch error (cudaSuccess otherwise). All
// pointers of `problem` are device pointers; `workspace` has workspace_bytes() bytes.
cudaError_t launch_smoothed_xent_rows(const RowsProblem& problem, int blocks_per_row, void* workspace,
                                      cudaStream_t stream);

// Vocabulary parallelism's statistics and gradient passes over a slice, one block per row.
cudaError_t launch_slice_statistics(const SliceProblem& problem, cudaStream_t stream);
cudaError_t launch_slice_gradient(const SliceProblem& problem, cudaStream_t stream);

}  // namespace fused_ls::cuda
