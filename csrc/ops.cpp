// The Python module of the native extension. Importing it runs the kernels' registrations
// (TORCH_LIBRARY_IMPL in cpu/ and cuda/) for ops whose schemas Python defines once for every
// backend (fused_ls/_row_op.py, fused_ls/linear.py): the fused_ls namespace has no DEF
// library (TORCH_LIBRARY), only FRAGMENT and IMPL ones, which coexist in any import order.
// The module itself only reports how the extension was built.
#include <Python.h>

#include "cpu/smoothed_xent_cpu.h"

namespace {

// The row-op contract this binary's kernels register for (fused_ls/native.py looks for it in
// the file before importing it: a binary built for another contract would abort the process
// when its registrations met the Python schemas). Bump with any change of the schemas.
constexpr const char* kRowOpContract = "fused_ls row-op contract 5: masses as floats, slice passes, argmax, given lse";

#ifdef FUSED_LS_WITH_CUDA
constexpr long kWithCuda = 1;
#else
constexpr long kWithCuda = 0;
#endif

PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_ls::cpu::selected_kernel_isa());
}

PyMethodDef methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The instruction set of the CPU kernel variant this process uses (DEFAULT, AVX2 or AVX512)."},
    {nullptr, nullptr, 0, nullptr},
};

#define FUSED_LS_STR_(x) #x
#define FUSED_LS_STR(x) FUSED_LS_STR_(x)
#define FUSED_LS_CONCAT_(a, b) a##b
#define FUSED_LS_CONCAT(a, b) FUSED_LS_CONCAT_(a, b)

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    FUSED_LS_STR(TORCH_EXTENSION_NAME),
    "fused_ls native kernels; importing this module registers the fused_ls::smoothed_xent_rows* ops.",
    -1,
    methods,
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

}  // namespace

// TORCH_EXTENSION_NAME is _C from setup.py and the cache name in a just-in-time build.
PyMODINIT_FUNC FUSED_LS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) < 0 ||
      PyModule_AddStringConstant(module, "ROW_OP_CONTRACT", kRowOpContract) < 0 ||
      PyModule_AddStringConstant(module, "CPU_KERNEL_ISAS", fused_ls::cpu::compiled_kernel_isas()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
