// WKV_CHECK(cond, parts...): throws std::runtime_error (a Python RuntimeError) with the parts joined.
// Why not TORCH_CHECK: on the H200 image of 2026-12-01 (torch 2.11 built with gcc-toolset-13, extensions built with
// Ubuntu's g++ 13.3) a failing TORCH_CHECK in an extension killed the process, a one-line load_inline one included,
// while a plain std::runtime_error was raised cleanly. The message is joined with std::string and std::to_string
// (no c10::Error, no iostreams), so a refusal takes no code path that crashed there.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

namespace wkv::detail {

inline void append(std::string& s, const char* part) { s += part; }
inline void append(std::string& s, const std::string& part) { s += part; }
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T part) { s += std::to_string(part); }

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  (append(message, parts), ...);
  throw std::runtime_error(message);
}

}  // namespace wkv::detail

#define WKV_CHECK(cond, ...)                                                                      \
  do {                                                                                            \
    if (!(cond)) ::wkv::detail::fail(__VA_ARGS__);                                                \
  } while (0)

#ifdef __CUDACC__
#include <cuda_runtime.h>

// C10_CUDA_KERNEL_LAUNCH_CHECK's test, thrown the same way: a bad launch configuration names the CUDA error.
#define WKV_LAUNCH_CHECK()                                                                        \
  do {                                                                                            \
    const cudaError_t wkv_launch_error = cudaGetLastError();                                      \
    WKV_CHECK(wkv_launch_error == cudaSuccess, "wkv: kernel launch failed: ",                     \
              cudaGetErrorString(wkv_launch_error));                                              \
  } while (0)
#endif
