// The schema of the native fused op, declared once; the CPU (cpu/) and CUDA (cuda/)
// implementations register for their dispatch keys, and fused_ls/native.py adds the fake
// (meta) implementations. The Triton kernels register their own ops in the same namespace
// from Python with torch.library.custom_op, which opens FRAGMENT libraries: those coexist
// with this one definition (TORCH_LIBRARY) in either import order. Python must therefore
// never open a second "DEF" library for the fused_ls namespace.
//
// Importing the extension (fused_ls._C, or its just-in-time build) runs the registrations;
// the Python module itself only reports how the extension was built.
#include <Python.h>

#include <torch/library.h>

#include "cpu/smoothed_xent_cpu.h"

TORCH_LIBRARY(fused_ls, m) {
  // Same arguments as fused_ls::smoothed_xent_rows_triton; see fused_ls/backends.py.
  m.def(
      "smoothed_xent_rows(Tensor logits, Tensor target, Tensor? weight, Tensor grad_scale, "
      "float label_smoothing, bool smooth_others, int ignore_index, float z_loss, float softcap, "
      "float logit_scale) -> (Tensor loss_rows, Tensor lse, Tensor grad)");
  // The gradient is written into `logits`.
  m.def(
      "smoothed_xent_rows_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor grad_scale, "
      "float label_smoothing, bool smooth_others, int ignore_index, float z_loss, float softcap, "
      "float logit_scale) -> (Tensor loss_rows, Tensor lse)");
  // The loss and lse alone, for a forward that needs no gradient (evaluation, no_grad): the
  // same first pass, and not a byte of gradient written or allocated.
  m.def(
      "smoothed_xent_rows_loss(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, "
      "bool smooth_others, int ignore_index, float z_loss, float softcap, float logit_scale) "
      "-> (Tensor loss_rows, Tensor lse)");
}

namespace {

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
      PyModule_AddStringConstant(module, "CPU_KERNEL_ISAS", fused_ls::cpu::compiled_kernel_isas()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
