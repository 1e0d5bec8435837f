// Which of the per-instruction-set kernel variants (DEFAULT, AVX2, AVX512; see
// fused_ls/_native_build.py) this process runs: the best one compiled into the build that
// torch's own choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) allows and
// the CPU executes. torch reports ATEN_CPU_CAPABILITY=avx512 as given even on a CPU without
// AVX-512 (many AMD EPYCs), so the CPU's own features are checked too: a variant the CPU
// cannot run would die of SIGILL.
#pragma once

#include <string>

#include <ATen/Version.h>

namespace fused_ls::cpu {

// The instructions each variant is compiled with (_native_build.py's flags), as the CPU reports them.
inline bool cpu_runs_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_runs_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_runs_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

inline const char* selected_isa() {
  static const char* const isa = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef FUSED_LS_CPU_AVX512
    if (capability == "AVX512" && cpu_runs_avx512()) return "AVX512";
#endif
#ifdef FUSED_LS_CPU_AVX2
    if ((capability == "AVX512" || capability == "AVX2") && cpu_runs_avx2()) return "AVX2";
#endif
    return "DEFAULT";
  }();
  return isa;
}

// The variant of a kernel function for selected_isa(); a variant not compiled in is nullptr
// and never selected.
template <typename Fn>
Fn select_variant(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  const std::string isa = selected_isa();
  if (isa == "AVX512") return avx512_fn;
  if (isa == "AVX2") return avx2_fn;
  return default_fn;
}

}  // namespace fused_ls::cpu

#ifdef FUSED_LS_CPU_AVX2
#define FUSED_LS_AVX2_VARIANT(fn) &::fused_ls::cpu::AVX2::fn
#else
#define FUSED_LS_AVX2_VARIANT(fn) nullptr
#endif
#ifdef FUSED_LS_CPU_AVX512
#define FUSED_LS_AVX512_VARIANT(fn) &::fused_ls::cpu::AVX512::fn
#else
#define FUSED_LS_AVX512_VARIANT(fn) nullptr
#endif
// The selected variant of fused_ls::cpu::<ISA>::fn, e.g. FUSED_LS_SELECT_VARIANT(smoothed_xent_rows).
#define FUSED_LS_SELECT_VARIANT(fn)                                                     \
  ::fused_ls::cpu::select_variant<decltype(&::fused_ls::cpu::DEFAULT::fn)>(            \
      &::fused_ls::cpu::DEFAULT::fn, FUSED_LS_AVX2_VARIANT(fn), FUSED_LS_AVX512_VARIANT(fn))
