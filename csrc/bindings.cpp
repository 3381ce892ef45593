// The Python module of the compiled extension. Operator schemas live beside
// their CPU kernels (csrc/cpu/<family>.cpp, TORCH_LIBRARY_FRAGMENT of the
// namespace pyclloss_C); CUDA implementations register in csrc/cuda/.
#include <torch/extension.h>


// Reports how the extension was built, for `pyclloss info` and backends().
static bool built_with_cuda() {
#ifdef PYCLLOSS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", &built_with_cuda);
  m.def("built_with_openmp", &built_with_openmp);
}
