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

// The torch.__version__ this extension was compiled against, passed by setup.py
// as bare tokens (2.13.0+cpu) that survive the build's shell quoting; the
// package refuses the kernels under any other torch.
#ifndef PYCLLOSS_TORCH_VERSION
#error "PYCLLOSS_TORCH_VERSION is not defined: build the extension through setup.py"
#endif
#define PYCLLOSS_STRINGIFY(tokens) #tokens
#define PYCLLOSS_EXPAND_STRINGIFY(macro) PYCLLOSS_STRINGIFY(macro)

static std::string built_with_torch() {
  return PYCLLOSS_EXPAND_STRINGIFY(PYCLLOSS_TORCH_VERSION);
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
  m.def("built_with_torch", &built_with_torch);
}
