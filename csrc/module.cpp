// The Python module limuon_kernels._C. Importing it runs the TORCH_LIBRARY_IMPL blocks of csrc/cpu/,
// which register the CPU kernels of the limuon:: ops whose schemas limuon_kernels/ops.py defines.
// The module itself only tells Python what it was built against and what it registered.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <string>
#include <vector>

// setup.py passes torch.__version__ unquoted (a quoted string define does not survive both the shell
// that ninja runs and a build without one); without it, fall back to the headers' own version, which
// lacks the local tag ("+cpu") and the pre-release suffix of nightlies.
#define LIMUON_STRINGIFY_(x) #x
#define LIMUON_STRINGIFY(x) LIMUON_STRINGIFY_(x)
#ifdef LIMUON_TORCH_VERSION
static const char* const kTorchVersion = LIMUON_STRINGIFY(LIMUON_TORCH_VERSION);
#else
static const char* const kTorchVersion = TORCH_VERSION;
#endif

namespace {

// Asked of the dispatcher rather than kept as a list, so it reports what actually registered.
std::vector<std::string> registered_kernels() {
  std::vector<std::string> names;
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNamesForDispatchKey(c10::DispatchKey::CPU)) {
    if (op.name.rfind("limuon::", 0) == 0) {
      names.push_back(op.name.substr(8));
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "limuon-kernels C++ CPU kernels (registered with the torch dispatcher on import)";
  m.attr("TORCH_VERSION") = kTorchVersion;
  m.def("kernels", &registered_kernels,
        "Names of the limuon:: ops that have a C++ CPU kernel in this build, sorted.");
}
