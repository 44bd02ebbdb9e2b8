// Argument checks shared by every launcher. Python validates first and gives the friendly message;
// these re-checks guard the C++ entry points themselves (called with raw pointers from Python), so
// that a bad call throws instead of crashing. pybind11 maps std::invalid_argument to ValueError and
// std::runtime_error to RuntimeError.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pyllm {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace pyllm

#define PYLLM_CHECK(cond, ...)                                                               \
  do {                                                                                       \
    if (!(cond)) throw std::invalid_argument(::pyllm::concat("pyllm: ", __VA_ARGS__));      \
  } while (0)

#define PYLLM_CHECK_RUNTIME(cond, ...)                                                       \
  do {                                                                                       \
    if (!(cond)) throw std::runtime_error(::pyllm::concat("pyllm: ", __VA_ARGS__));         \
  } while (0)
