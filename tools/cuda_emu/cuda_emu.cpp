// The emulator's runtime (cuda_emu.h says what it models): fibers for a block's threads, the
// barriers and warp meetings they wait at, launch checks, and the CUDA runtime calls pyllm's
// launchers make, answered for one emulated device whose size the tests set.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

Thread* current = nullptr;
dim3 block_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;  // what a launch gets without the opt-in attribute

struct Device {
  int sms = 4;  // few SMs: grid-stride loops take several turns, and the emulation stays quick
  int major = 9, minor = 0;
  int smem_optin = 227 * 1024;  // sm_90's; sm_80's is 163 KB, sm_86 / sm_89's 99 KB
  int smem_per_sm = 228 * 1024;
} device;

enum class State { kRun, kBlockWait, kWarpWait, kDone };

struct Fiber : Thread {
  ucontext_t ctx;
  State state = State::kRun;
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int live = 0;
  int block_arrived = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_live;  // live lanes' bits
  std::vector<unsigned char> slots;
  void (*body)(void*) = nullptr;
  void* state = nullptr;
  std::string error;
};

Block* block = nullptr;
std::vector<char*> stacks;
std::vector<unsigned char> smem;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute's opt-ins
cudaError_t last_error = cudaSuccess;
std::string last_message;

Fiber* me() { return static_cast<Fiber*>(current); }

[[noreturn]] void fail(const std::string& what) { throw Failure(what); }

void wait(State s) {
  Fiber* f = me();
  f->state = s;
  swapcontext(&f->ctx, &block->scheduler);
  if (!block->error.empty()) fail("");  // another thread failed: unwind this one too
}

void release(State s, int warp = -1) {
  for (auto& f : block->fibers)
    if (f.state == s && (warp < 0 || f.linear / 32 == warp)) f.state = State::kRun;
}

std::string where(const char* file, int line) {
  std::string f = file;
  const auto slash = f.rfind('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

void maybe_release_block() {
  if (block->block_arrived > 0 && block->block_arrived == block->live) {
    block->block_arrived = 0;
    release(State::kBlockWait);
  }
}

void fiber_main() {
  Fiber* f = me();
  try {
    block->body(block->state);
  } catch (const Failure& e) {
    if (block->error.empty()) block->error = e.what();
  } catch (const std::exception& e) {
    if (block->error.empty()) block->error = std::string("exception in a kernel: ") + e.what();
  }
  f->state = State::kDone;
  if (!block->error.empty()) return;
  const int warp = f->linear / 32;
  --block->live;
  block->warp_live[warp] &= ~(1u << (f->linear % 32));
  if (block->warp_arrived[warp] > 0) {
    block->error = "thread " + std::to_string(f->linear) + " exited while its warp's other lanes wait in a warp "
                   "collective (a full-mask shuffle without this lane: undefined on the GPU)";
    return;
  }
  maybe_release_block();
}

char* stack(size_t i) {
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: no memory for a fiber's stack");
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[i];
}

void run_block(Block& b) {
  const int n = int(block_dim.x * block_dim.y * block_dim.z);
  const int warps = (n + 31) / 32;
  b.fibers.assign(n, Fiber());
  b.live = n;
  b.warp_arrived.assign(warps, 0);
  b.warp_live.assign(warps, 0);
  b.slots.assign(size_t(warps) * 32 * 16, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.idx = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y));
    b.warp_live[i / 32] |= 1u << (i % 32);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  block = &b;
  for (;;) {
    bool ran = false;
    for (auto& f : b.fibers) {
      if (f.state != State::kRun) continue;
      current = &f;
      ran = true;
      swapcontext(&b.scheduler, &f.ctx);
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    bool done = true;
    for (auto& f : b.fibers) done = done && f.state == State::kDone;
    if (done) break;
    if (!ran) {
      int at_barrier = 0, in_warp = 0;
      for (auto& f : b.fibers) {
        at_barrier += f.state == State::kBlockWait;
        in_warp += f.state == State::kWarpWait;
      }
      b.error = "deadlock (a hang on the GPU): " + std::to_string(at_barrier) + " threads wait at __syncthreads (" +
                where(b.barrier_file ? b.barrier_file : "?", b.barrier_line) + "), " + std::to_string(in_warp) +
                " in warp collectives, the others have exited";
      break;
    }
  }
  current = nullptr;
  block = nullptr;
}

void set_error(cudaError_t e, const std::string& message) {
  last_error = e;
  last_message = message;
}

}  // namespace

void syncthreads(const char* file, int line) {
  Block& b = *block;
  if (b.block_arrived == 0) {
    b.barrier_file = file;
    b.barrier_line = line;
  } else if (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0) {
    fail("threads of one block wait at two different __syncthreads: " + where(b.barrier_file, b.barrier_line) +
         " and " + where(file, line) + " (undefined on the GPU: a hang or a barrier that does not separate)");
  }
  if (++b.block_arrived == b.live) {
    b.block_arrived = 0;
    release(State::kBlockWait);
    return;
  }
  wait(State::kBlockWait);
}

void warp_meet(unsigned mask, const char* what) {
  Block& b = *block;
  Fiber* f = me();
  const int warp = f->linear / 32, lane = f->linear % 32;
  const int n = int(b.fibers.size());
  const unsigned present = (warp + 1) * 32 <= n ? 0xffffffffu : (1u << (n - warp * 32)) - 1u;
  if (!(mask >> lane & 1u)) fail(std::string(what) + " called by lane " + std::to_string(lane) + " outside its mask");
  if ((mask & present) != mask)
    fail(std::string(what) + " with mask " + std::to_string(mask) + " in a warp of " +
         std::to_string(__builtin_popcount(present)) + " threads (block of " + std::to_string(n) +
         "): lanes that do not exist (undefined on the GPU)");
  if ((mask & b.warp_live[warp]) != mask)
    fail(std::string(what) + ": lanes named in its mask have exited (undefined on the GPU)");
  if (++b.warp_arrived[warp] == __builtin_popcount(mask)) {
    b.warp_arrived[warp] = 0;
    release(State::kWarpWait, warp);
    return;
  }
  wait(State::kWarpWait);
}

void* dynamic_smem() { return smem.data(); }

unsigned char* lane_slot(int warp, int lane) { return block->slots.data() + (size_t(warp) * 32 + lane) * 16; }

void run_grid(const void* kernel, const LaunchConfig& c, void (*body)(void*), void* state) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0)
    return set_error(cudaErrorInvalidConfiguration, "an empty grid or block");
  if (threads > 1024 || c.block.z > 64) return set_error(cudaErrorInvalidConfiguration, "a block of over 1,024 threads");
  if (c.grid.x > 2147483647u || c.grid.y > 65535u || c.grid.z > 65535u)
    return set_error(cudaErrorInvalidConfiguration, "a grid past CUDA's limits");
  auto opt = max_dynamic_smem.find(kernel);
  const size_t allowed = opt == max_dynamic_smem.end() ? kDefaultSmem : size_t(opt->second);
  if (c.smem > allowed)
    return set_error(cudaErrorInvalidValue, "dynamic shared memory of " + std::to_string(c.smem) +
                                                " bytes past the kernel's " + std::to_string(allowed));
  smem.assign(std::max<size_t>(c.smem, 16), 0xCD);  // garbage, as the GPU's: a kernel must write before it reads
  grid_dim = c.grid;
  block_dim = c.block;
  Block b;
  b.body = body;
  b.state = state;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) {
        block_idx = dim3(x, y, z);
        run_block(b);
        if (!b.error.empty())
          return set_error(cudaErrorLaunchFailure, "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                                       std::to_string(z) + "): " + b.error);
      }
}

}  // namespace emu

// --- the runtime calls pyllm's launchers make -----------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError(void) {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return emu::last_error; }
const char* cudaGetErrorString(cudaError_t) { return emu::last_message.c_str(); }
const char* cudaGetErrorName(cudaError_t) { return "cuda_emu error"; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaDeviceReset(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::device.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::device.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = emu::device.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::device.smem_optin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(emu::kDefaultSmem); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::device.smem_per_sm; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: emu::set_error(cudaErrorInvalidValue, "cuda_emu: a device attribute it does not model"); return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  attr->numRegs = 64;
  auto opt = emu::max_dynamic_smem.find(func);
  attr->maxDynamicSharedSizeBytes = opt == emu::max_dynamic_smem.end() ? int(emu::kDefaultSmem) : opt->second;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > emu::device.smem_optin) {
      emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: past the device's opt-in shared memory");
      return cudaErrorInvalidValue;
    }
    emu::max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size, size_t smem) {
  int n = std::min(32, 2048 / std::max(block_size, 1));
  if (smem > 0) n = std::min<int>(n, int(emu::device.smem_per_sm / (smem + 1024)));
  *blocks = n;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = std::malloc(std::max<size_t>(bytes, 1));
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMalloc(void** p, size_t bytes) { return cudaMallocAsync(p, bytes, nullptr); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return cudaSuccess; }

// For the tests: the emulated device's size (SMs, compute capability, opt-in shared memory per block).
void emu_set_device(int sms, int major, int minor, int smem_optin) {
  emu::device.sms = sms;
  emu::device.major = major;
  emu::device.minor = minor;
  emu::device.smem_optin = smem_optin;
  emu::device.smem_per_sm = smem_optin + 1024;  // (opt-ins set before stay: launchers cache them)
}

}  // extern "C"
