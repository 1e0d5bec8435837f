// Vector loads and stores for the per-instruction-set CPU kernels (smoothed_xent_kernel.cpp,
// compensated_add_kernel.cpp): kStep elements of any float dtype as two accumulator vectors,
// fp32 for bfloat16 and float16 (converted on load, rounded to nearest even on store).
// Include it only from a file compiled with -DCPU_CAPABILITY (see fused_ls/_native_build.py):
// every variant gets its own copy, in its own namespace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (see fused_ls/_native_build.py)"
#endif

namespace fused_ls::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads and stores kStep elements as two accumulator vectors (one reduced-precision vector
// holds exactly two fp32 vectors' worth).
template <typename scalar_t>
struct RowIo {  // float, double: the accumulator type itself
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kStep = 2 * kLanes;

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  }
  static void load_partial(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    a = Vec::loadu(p, std::min(n, kLanes));
    b = n > kLanes ? Vec::loadu(p + kLanes, n - kLanes) : Vec(acc_t(0));
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kLanes);
  }
  static void store_partial(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    a.store(p, static_cast<int>(std::min(n, kLanes)));
    if (n > kLanes) b.store(p + kLanes, static_cast<int>(n - kLanes));
  }
};

template <typename reduced_t>
struct ReducedRowIo {  // bfloat16, float16: converted to fp32 on load, rounded (RNE) on store
  using acc_t = float;
  using Vec = Vectorized<float>;
  using ReducedVec = Vectorized<reduced_t>;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kStep = ReducedVec::size();
  static_assert(kStep == 2 * kLanes, "a reduced-precision vector must hold two fp32 vectors");

  static void load(const reduced_t* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<reduced_t>(ReducedVec::loadu(p));
  }
  static void load_partial(const reduced_t* p, int64_t n, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<reduced_t>(ReducedVec::loadu(p, n));
  }
  static void store(reduced_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<reduced_t>(a, b).store(p);
  }
  static void store_partial(reduced_t* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<reduced_t>(a, b).store(p, static_cast<int>(n));
  }
};
template <>
struct RowIo<c10::BFloat16> : ReducedRowIo<c10::BFloat16> {};
template <>
struct RowIo<c10::Half> : ReducedRowIo<c10::Half> {};

}  // namespace
}  // namespace fused_ls::cpu::CPU_CAPABILITY
