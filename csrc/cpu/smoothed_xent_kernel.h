// The CPU row kernel, compiled once per instruction set (see fused_ls/_native_build.py):
// smoothed_xent_kernel.cpp is built with -DCPU_CAPABILITY=DEFAULT, =AVX2 (-mavx2 -mfma ...)
// and =AVX512 (-mavx512f ...), each into its own namespace, exactly as ATen builds its own
// kernels; smoothed_xent_cpu.cpp picks one at run time from at::get_cpu_capability(), so a
// binary built on one x86-64 machine runs on any other.
#pragma once

#include <cstdint>

#include "../smoothed_xent.h"

namespace fused_ls::cpu {

// Rows [row_begin, row_end) of `problem`, on the calling thread.
using RowsFn = void (*)(const RowsProblem& problem, int64_t row_begin, int64_t row_end);
using SliceFn = void (*)(const SliceProblem& problem, int64_t row_begin, int64_t row_end);

namespace DEFAULT {
void smoothed_xent_rows(const RowsProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_statistics(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_gradient(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
}
namespace AVX2 {
void smoothed_xent_rows(const RowsProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_statistics(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_gradient(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
}
namespace AVX512 {
void smoothed_xent_rows(const RowsProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_statistics(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
void smoothed_xent_slice_gradient(const SliceProblem& problem, int64_t row_begin, int64_t row_end);
}

}  // namespace fused_ls::cpu
