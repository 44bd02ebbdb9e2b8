// The emulator's runtime (cuda_emu.h says what it models): fibers for a block's threads, the
// barriers and warp meetings they wait at, launch checks, and the CUDA runtime calls pyllm's
// launchers make, answered for one emulated device whose size the tests set.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

// Race mode (build.py --race, PYLLM_EMU_RACE=1): the kernels' units are compiled with
// -fsanitize=thread and this file tells ThreadSanitizer what the GPU orders. Each thread of a block is
// a TSan fiber, switched to without synchronizing; a __syncthreads is a release by every arriving
// thread and an acquire by each as it leaves, and so is a warp collective for its warp; blocks are
// ordered one after another (racecheck's scope is a block's shared memory; this sees its global
// memory too). ldmatrix's rows (read here, uninstrumented) are reported as the lane's own reads, and
// cp.async's copies as accesses of the lane's copy engine (cp_async_16 says why). TSan then reports any two
// accesses to one address, one a write, with no barrier between them: a race on the GPU whichever
// order the emulator happened to run them in.
#if PYLLM_EMU_RACE
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_read_range_pc(void* addr, unsigned long size, void* pc);
void __tsan_write_range_pc(void* addr, unsigned long size, void* pc);
}
#define RACE(...) __VA_ARGS__
#else
#define RACE(...)
#endif

namespace emu {

Thread* current = nullptr;
dim3 block_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 32;  // a lane's share of a warp exchange: mma's 6 registers fit
constexpr size_t kDefaultSmem = 48 * 1024;  // what a launch gets without the opt-in attribute

struct Device {
  int sms = 4;  // few SMs: grid-stride loops take several turns, and the emulation stays quick
  int major = 9, minor = 0;
  int smem_optin = 227 * 1024;  // sm_90's; sm_80's is 163 KB, sm_86 / sm_89's 99 KB
  int smem_per_sm = 228 * 1024;
} device;

enum class State { kRun, kBlockWait, kWarpWait, kDone };

struct Copy {
  unsigned char* dst;
  unsigned char bytes[16];
};

struct Fiber : Thread {
  ucontext_t ctx;  // its first entry
  jmp_buf env;     // where it waits, once started
  bool started = false;
  State state = State::kRun;
  std::vector<std::vector<Copy>> groups;  // cp.async: committed groups, oldest first
  std::vector<Copy> open;                 // issued since the last commit
  void* tsan = nullptr;                   // race mode: its TSan fiber,
  void* engine = nullptr;                 // its cp.async copies' (cp_async_16 says why)
  char issued = 0, landed = 0;            // and the objects that order the two
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;  // (a fiber's first entry saves here; never resumed)
  jmp_buf scheduler_env;
  int live = 0;
  int block_arrived = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::vector<int> warp_arrived;
  unsigned barrier_generation = 0;  // race mode: barriers alternate between two sync objects, so a
  std::vector<unsigned> warp_generation;  // thread that runs ahead to the next one does not release
  char barrier_sync[2];                   // into the one a slower thread has still to acquire
  std::vector<char> warp_sync;            // (2 per warp)
  void* scheduler_tsan = nullptr;
  std::vector<unsigned> warp_live;  // live lanes' bits
  std::vector<unsigned char> slots;
  void (*body)(void*) = nullptr;
  void* state = nullptr;
  std::string error;
};

Block* block = nullptr;
// Race mode: the scheduler releases block_start before each block and its threads acquire it as they
// start; they release block_end as they end and the scheduler acquires it after the block. (Two
// objects: with one, a thread starting after another had ended would be ordered after all it did.)
char block_start, block_end;
std::vector<char*> stacks;
std::vector<void*> tsan_fibers, tsan_engines;  // race mode: per fiber slot, kept (as the stacks are) across blocks
std::vector<unsigned char> smem;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute's opt-ins
// The order blocks run in (emu_set_block_order): 0 the grid's (x fastest), 1 reversed, 2 a shuffle
// drawn from block_seed per launch. A GPU runs them in any order, and at once: a kernel whose answer
// (or, for pyllm's deterministic kernels, whose bits) changes with the order reads what another
// block of the same launch writes.
int block_order = 0;
uint64_t block_seed = 0;
// What shared memory holds before a block writes it: all-ones bytes, NaN in every float type (and
// -1 / the largest unsigned in the integer ones), so that a read of it shows in the answers; a byte
// like 0xCD reads as -4e-8 in fp32, which a sum can swallow.
constexpr unsigned char kGarbage = 0xFF;
// The static __shared__ arrays seen so far (static_smem): refilled with garbage before each block.
std::map<void*, size_t> static_arrays;

// Garbage, by byte stores TSan does not intercept (a memset would count as the current fiber's write).
void poison(void* p, size_t bytes) {
  auto* q = static_cast<unsigned char*>(p);
  size_t i = 0;
  for (; i < bytes && reinterpret_cast<uintptr_t>(q + i) % 8; ++i) static_cast<volatile unsigned char*>(q)[i] = kGarbage;
  for (; i + 8 <= bytes; i += 8) *reinterpret_cast<volatile uint64_t*>(q + i) = ~uint64_t(0);  // (kGarbage x 8)
  for (; i < bytes; ++i) static_cast<volatile unsigned char*>(q)[i] = kGarbage;
}
cudaError_t last_error = cudaSuccess;
std::string last_message;

Fiber* me() { return static_cast<Fiber*>(current); }

[[noreturn]] void fail(const std::string& what) { throw Failure(what); }

// Switching by _setjmp / _longjmp (no signal mask saved: swapcontext's rt_sigprocmask system call
// per switch had made the attention tests 10x slower); ucontext only makes each fiber's first entry.
void wait(State s) {
  Fiber* f = me();
  f->state = s;
  if (_setjmp(f->env) == 0) {
    RACE(__tsan_switch_to_fiber(block->scheduler_tsan, 1));
    _longjmp(block->scheduler_env, 1);
  }  // (after a failure the scheduler resumes no one)
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

// Back to the scheduler for good: the thread has ended (or the block failed).
[[noreturn]] void leave() {
  RACE(__tsan_release(&block_end); __tsan_switch_to_fiber(block->scheduler_tsan, 1));
  _longjmp(block->scheduler_env, 1);
}

void fiber_main() {
  Fiber* f = me();
  RACE(__tsan_acquire(&block_start));
  try {
    block->body(block->state);
  } catch (const Failure& e) {
    if (block->error.empty()) block->error = e.what();
  } catch (const std::exception& e) {
    if (block->error.empty()) block->error = std::string("exception in a kernel: ") + e.what();
  }
  f->state = State::kDone;
  if (!block->error.empty()) leave();
  const int warp = f->linear / 32;
  --block->live;
  block->warp_live[warp] &= ~(1u << (f->linear % 32));
  if (block->warp_arrived[warp] > 0) {
    block->error = "thread " + std::to_string(f->linear) + " exited while its warp's other lanes wait in a warp "
                   "collective (a full-mask shuffle without this lane: undefined on the GPU)";
    leave();
  }
  maybe_release_block();
  leave();
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
  b.slots.assign(size_t(warps) * 32 * kSlotBytes, 0);
#if PYLLM_EMU_RACE
  b.warp_generation.assign(warps, 0);
  b.warp_sync.assign(2 * size_t(warps), 0);
  b.scheduler_tsan = __tsan_get_current_fiber();
  while (tsan_fibers.size() < size_t(n)) {
    // (a report's "created at" names the launch that first needed the slot; these names say which thread it is)
    const std::string thread = "thread " + std::to_string(tsan_fibers.size()) + " of its block";
    tsan_fibers.push_back(__tsan_create_fiber(0));
    __tsan_set_fiber_name(tsan_fibers.back(), thread.c_str());
    tsan_engines.push_back(__tsan_create_fiber(0));
    __tsan_set_fiber_name(tsan_engines.back(), ("the cp.async copies of " + thread).c_str());
  }
  __tsan_release(&block_start);  // the launch's arguments and the blocks before, all ordered before this one
#endif
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.idx = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y));
    b.warp_live[i / 32] |= 1u << (i % 32);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;  // (fiber_main never returns: it jumps back to the scheduler)
    makecontext(&f.ctx, fiber_main, 0);
    RACE(f.tsan = tsan_fibers[i]; f.engine = tsan_engines[i]);
  }
  block = &b;
  for (;;) {
    bool ran = false;
    for (auto& f : b.fibers) {
      if (f.state != State::kRun) continue;
      current = &f;
      ran = true;
      if (_setjmp(b.scheduler_env) == 0) {
        RACE(__tsan_switch_to_fiber(f.tsan, 1));
        if (f.started) _longjmp(f.env, 1);
        f.started = true;
        swapcontext(&b.scheduler, &f.ctx);
      }
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
  RACE(__tsan_acquire(&block_end));  // (the host, and the next block, come after what this block did)
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
  RACE(void* sync = &b.barrier_sync[b.barrier_generation & 1]; __tsan_release(sync));
  if (++b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.barrier_generation;
    release(State::kBlockWait);
  } else {
    wait(State::kBlockWait);
  }
  RACE(__tsan_acquire(sync));
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
  RACE(void* sync = &b.warp_sync[2 * warp + (b.warp_generation[warp] & 1)]; __tsan_release(sync));
  if (++b.warp_arrived[warp] == __builtin_popcount(mask)) {
    b.warp_arrived[warp] = 0;
    RACE(++b.warp_generation[warp]);
    release(State::kWarpWait, warp);
  } else {
    wait(State::kWarpWait);
  }
  RACE(__tsan_acquire(sync));
}

void* dynamic_smem() { return smem.data(); }

void static_smem(void* p, size_t bytes) {
  if (static_arrays.emplace(p, bytes).second) poison(p, bytes);  // its first use: no thread wrote it yet
}

unsigned char* lane_slot(int warp, int lane) { return block->slots.data() + (size_t(warp) * 32 + lane) * kSlotBytes; }

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
  smem.resize(std::max<size_t>(c.smem, 16));  // (filled with garbage before each block, below)
  grid_dim = c.grid;
  block_dim = c.block;
  Block b;
  b.body = body;
  b.state = state;
  const uint64_t n_blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  std::vector<uint64_t> order;  // (the grid's order needs no list: grids of 2^31 blocks exist)
  if (block_order != 0) {
    order.resize(n_blocks);
    for (uint64_t i = 0; i < n_blocks; ++i) order[i] = block_order == 1 ? n_blocks - 1 - i : i;
    if (block_order == 2) {  // Fisher-Yates on splitmix64, seeded per launch
      uint64_t rng = block_seed++;
      auto next = [&rng] {
        uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
      };
      for (uint64_t i = n_blocks - 1; i > 0; --i) std::swap(order[i], order[next() % (i + 1)]);
    }
  }
  for (uint64_t i = 0; i < n_blocks; ++i) {
    const uint64_t linear = block_order == 0 ? i : order[i];
    const unsigned x = unsigned(linear % c.grid.x), y = unsigned(linear / c.grid.x % c.grid.y),
                   z = unsigned(linear / c.grid.x / c.grid.y);
    block_idx = dim3(x, y, z);
    // Each block finds garbage in shared memory, as on the GPU, not what the block before left:
    // a kernel must write before it reads.
    poison(smem.data(), smem.size());
    for (auto& [p, bytes] : static_arrays) poison(p, bytes);
    run_block(b);
    if (!b.error.empty())
      return set_error(cudaErrorLaunchFailure, "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                                   std::to_string(z) + "): " + b.error);
  }
}

void trap(const char* file, int line) { fail("__trap() at " + where(file, line)); }

uint32_t smem_offset(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < smem.data() || q >= smem.data() + smem.size())
    fail("a shared-space address outside the launch's dynamic shared memory");
  return uint32_t(q - smem.data());
}

namespace {
unsigned char* smem_at(uint32_t offset, size_t bytes, const char* what) {
  if (size_t(offset) + bytes > smem.size())
    fail(std::string(what) + ": shared offset " + std::to_string(offset) + " + " + std::to_string(bytes) +
         " past the launch's " + std::to_string(smem.size()) + " bytes of dynamic shared memory");
  return smem.data() + offset;
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) return __uint_as_float(uint32_t(h) << 16);
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
}  // namespace

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const int lane = current->linear % 32, warp = current->linear / 32;
  // (no meeting first: every collective's last meeting follows its last read of the slots)
  std::memcpy(lane_slot(warp, lane), &addr, 4);
  // this lane's row, read at the kernel's line (the wrappers in flash_attn_common.cuh are inlined)
  RACE(__tsan_read_range_pc(smem_at(addr, 16, "ldmatrix"), 16, __builtin_return_address(0)));
  warp_meet(0xffffffffu, "ldmatrix");
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {  // matrix j: its rows' addresses from lanes 8j..8j+7
    uint16_t lo, hi;
    if (!trans) {  // row g, columns 2t, 2t + 1
      uint32_t row;
      std::memcpy(&row, lane_slot(warp, 8 * j + g), 4);
      const unsigned char* p = smem_at(row, 16, "ldmatrix");
      std::memcpy(&lo, p + 4 * t, 2);
      std::memcpy(&hi, p + 4 * t + 2, 2);
    } else {  // column g of rows 2t, 2t + 1 (the transpose's row g)
      uint32_t row0, row1;
      std::memcpy(&row0, lane_slot(warp, 8 * j + 2 * t), 4);
      std::memcpy(&row1, lane_slot(warp, 8 * j + 2 * t + 1), 4);
      std::memcpy(&lo, smem_at(row0, 16, "ldmatrix.trans") + 2 * g, 2);
      std::memcpy(&hi, smem_at(row1, 16, "ldmatrix.trans") + 2 * g, 2);
    }
    r[j] = uint32_t(lo) | uint32_t(hi) << 16;
  }
  warp_meet(0xffffffffu, "ldmatrix");
}

void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const int lane = current->linear % 32, warp = current->linear / 32;
  uint32_t regs[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  std::memcpy(lane_slot(warp, lane), regs, sizeof(regs));
  warp_meet(0xffffffffu, "mma.sync");
  // A (16 x 16, row-major) and B (16 x 8, K x N) from every lane's fragments (flash_attn_common.cuh)
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    uint32_t f[6];
    std::memcpy(f, lane_slot(warp, l), sizeof(f));
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = half_bits_to_float(uint16_t(f[i] & 0xffff), bf16);
      A[rows[i]][cols[i] + 1] = half_bits_to_float(uint16_t(f[i] >> 16), bf16);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = half_bits_to_float(uint16_t(f[4 + i] & 0xffff), bf16);
      B[2 * t + 8 * i + 1][g] = half_bits_to_float(uint16_t(f[4 + i] >> 16), bf16);
    }
  }
  warp_meet(0xffffffffu, "mma.sync");
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {  // c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
    const int m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i % 2);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += double(A[m][k]) * double(B[k][n]);
    d[i] = float(double(d[i]) + acc);
  }
}

// Race mode: a copy's accesses are made by its thread's copy engine, a fiber of its own that is
// ordered after the issue (it acquires what the thread released there) and before the wait that
// covers it (the thread acquires what the engine released), and with nothing else: so any access
// by another thread, or by this one, that is not ordered before the issue or after the wait races
// with it, whenever the copy lands within that window on the GPU. (The engine releases at a wait
// everything issued so far, newer pending groups too: their copies count as landed a little early.)
void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  Fiber* f = me();
  if (src_bytes != 0 && src_bytes != 16) fail("cp.async of " + std::to_string(src_bytes) + " bytes: 0 or 16 here");
  Copy c;
  c.dst = smem_at(dst, 16, "cp.async");
  if (src_bytes) std::memcpy(c.bytes, src, 16);  // (read at issue: the source must stay put until the wait)
  else std::memset(c.bytes, 0, 16);
  f->open.push_back(c);
#if PYLLM_EMU_RACE
  void* pc = __builtin_return_address(0);
  __tsan_release(&f->issued);
  __tsan_switch_to_fiber(f->engine, 1);
  __tsan_acquire(&f->issued);
  if (src_bytes) __tsan_read_range_pc(const_cast<void*>(src), 16, pc);
  __tsan_write_range_pc(c.dst, 16, pc);
  __tsan_switch_to_fiber(f->tsan, 1);
#endif
}

void cp_async_commit() {
  Fiber* f = me();
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int newest_pending) {
  Fiber* f = me();
  if (int(f->groups.size()) <= newest_pending) return;
  while (int(f->groups.size()) > newest_pending) {
    for (const Copy& c : f->groups.front()) std::memcpy(c.dst, c.bytes, 16);
    f->groups.erase(f->groups.begin());
  }
  RACE(__tsan_switch_to_fiber(f->engine, 1); __tsan_release(&f->landed); __tsan_switch_to_fiber(f->tsan, 1);
       __tsan_acquire(&f->landed));
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
  attr->ptxVersion = attr->binaryVersion = emu::device.major * 10 + emu::device.minor;
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

// Events: the BPE encoder brackets its kernels with two (bench_bpe.py reads the time); here no time passes.
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new char(0));
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.0f;
  return cudaSuccess;
}

// For the tests: the emulated device's size (SMs, compute capability, opt-in shared memory per block).
void emu_set_device(int sms, int major, int minor, int smem_optin) {
  emu::device.sms = sms;
  emu::device.major = major;
  emu::device.minor = minor;
  emu::device.smem_optin = smem_optin;
  emu::device.smem_per_sm = smem_optin + 1024;  // (opt-ins set before stay: launchers cache them)
}

// For the tests: the order of a launch's blocks (0 the grid's, 1 reversed, 2 shuffled, from seed).
void emu_set_block_order(int order, uint64_t seed) {
  emu::block_order = order;
  emu::block_seed = seed;
}

}  // extern "C"
