// The CPU implementation's queries, for the Python module in ops.cpp.
#pragma once

namespace fused_ls::cpu {

// "DEFAULT", "AVX2" or "AVX512": the kernel variant this process runs (the best one compiled
// that at::get_cpu_capability() allows; ATEN_CPU_CAPABILITY=avx2|default lowers it).
const char* selected_kernel_isa();

// The variants compiled into this build, comma-separated.
const char* compiled_kernel_isas();

}  // namespace fused_ls::cpu
