// The CPU emulator's runtime: fibers, the scheduler, shared memory, launch checks and the
// runtime API subset declared in cuda_emulator.h.
//
// One block runs at a time, on the calling OS thread. Each CUDA thread is a fiber (own stack,
// switched by a small assembly routine: no system call per switch). A fiber runs until it
// reaches a synchronisation point (__syncthreads, __syncwarp, a warp collective) or exits;
// the scheduler then resumes the ready fibers in the order the schedule mode gives:
//   forward     threads 0, 1, ..., n - 1 in each round; blocks in order
//   reverse     threads n - 1, ..., 0; blocks in reverse order
//   random      a seeded random permutation of the ready threads each round, and of the blocks
//   warp_ahead  after every barrier one warp (seeded choice) runs alone until its lanes are at
//               the next barrier or done, then the others run forward
// When no fiber is ready: if every live thread waits at the same __syncthreads they are all
// released; otherwise the block is deadlocked (divergent barrier, lanes missing from a warp
// collective) and the launch fails with a message naming the kernel, the block and the
// threads. A failed kernel leaves the emulated context broken ("sticky"), as on a GPU, until
// facedeblur_emulator_reset().
#include "cuda_emulator/cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FACEDEBLUR_EMULATOR_ASAN 1
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, and continues on new_sp (System V x86-64 ABI).
extern "C" void facedeblur_emulator_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .hidden facedeblur_emulator_switch
  .type facedeblur_emulator_switch, @function
facedeblur_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size facedeblur_emulator_switch, .-facedeblur_emulator_switch
)");

extern "C" [[noreturn]] void facedeblur_emulator_fiber_main();

namespace facedeblur::emulator {
namespace {

// H100 (sm_90) limits.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64;
constexpr uint64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
constexpr size_t kDefaultSmem = 48 * 1024;    // per block without the opt-in attribute
constexpr size_t kOptInSmem = 227 * 1024;     // per block with it (static + dynamic)
constexpr int kDefaultSmCount = 132;

constexpr size_t kGuard = 64;                 // poisoned bytes around every shared variable
constexpr size_t kArenaBytes = 512 * 1024;    // room for any legal block and its guards
constexpr size_t kStackBytes = 256 * 1024;    // per fiber, plus a guard page below
constexpr unsigned char kPoison = 0xff;       // unwritten float/double reads as NaN

enum class Schedule : int { kForward = 0, kReverse = 1, kRandom = 2, kWarpAhead = 3 };
enum class State { kReady, kBarrier, kWarp, kDone };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

std::string site(const std::source_location& w) {
  std::string file = w.file_name();
  const size_t slash = file.rfind('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(w.line());
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

// "0-31, 40, 64-70"
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack_bottom = nullptr;  // lowest usable byte (a guard page lies below)
  void* asan_fake_stack = nullptr;
  uint3 idx{0, 0, 0};
  State state = State::kReady;
  std::source_location where;  // the barrier or collective it waits at
  WarpOp op = WarpOp::kSyncwarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  size_t next_shared_decl = 0;
};

struct SharedVar {
  size_t offset, bytes;
  std::source_location where;
};

struct Block {
  const KernelInfo* kernel = nullptr;
  void (*body)(void*) = nullptr;
  void* params = nullptr;
  int threads = 0;
  size_t dynamic_bytes = 0;
  size_t used = 0;  // arena bytes up to the end of the last allocation
  std::vector<SharedVar> statics;
  std::string fault;  // non-empty: the block failed
};

struct Emulator {
  Schedule schedule = Schedule::kForward;
  std::mt19937_64 rng{0};
  int sm_count = kDefaultSmCount;
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky_error = cudaSuccess;
  std::string message;
  std::string launch_log;
  std::unordered_map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
  std::unordered_map<const void*, size_t> static_smem;    // learnt from a first block
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreadsPerBlock);
  unsigned char* arena = nullptr;
  size_t arena_dirty = kArenaBytes;  // bytes to re-poison at the next block start
  bool stacks_abandoned = false;
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  int current = -1;
  Block* block = nullptr;
};

Emulator& emu() {
  static Emulator* e = [] {
    auto* em = new Emulator;
    em->arena = static_cast<unsigned char*>(std::aligned_alloc(64, kArenaBytes));
    return em;
  }();
  return *e;
}

// ---- context switches (with AddressSanitizer's fiber annotations when it is on) ----

void switch_context(void** save_sp, void* new_sp, void** fake_stack, const void* bottom,
                    size_t size) {
#if defined(FACEDEBLUR_EMULATOR_ASAN)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
  facedeblur_emulator_switch(save_sp, new_sp);
#if defined(FACEDEBLUR_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack != nullptr ? *fake_stack : nullptr, nullptr,
                                  nullptr);
#endif
}

void resume(Emulator& e, int t) {
  Fiber& f = e.fibers[t];
  e.current = t;
  threadIdx = f.idx;
  switch_context(&e.scheduler_sp, f.sp, &e.scheduler_fake_stack, f.stack_bottom, kStackBytes);
  e.current = -1;
}

// From a fiber: back to the scheduler, which resumes it later (or never, after a fault).
void yield_to_scheduler() {
  Emulator& e = emu();
  Fiber& f = e.fibers[e.current];
  switch_context(&f.sp, e.scheduler_sp, &f.asan_fake_stack, e.scheduler_stack_bottom,
                 e.scheduler_stack_size);
}

[[noreturn]] void leave_fiber_forever() {
  Emulator& e = emu();
  void* unused = nullptr;
#if defined(FACEDEBLUR_EMULATOR_ASAN)
  __sanitizer_start_switch_fiber(nullptr, e.scheduler_stack_bottom, e.scheduler_stack_size);
#endif
  facedeblur_emulator_switch(&unused, e.scheduler_sp);
  __builtin_unreachable();
}

std::string thread_label(const Fiber& f) {
  return "thread (" + std::to_string(f.idx.x) + "," + std::to_string(f.idx.y) + "," +
         std::to_string(f.idx.z) + ")";
}

std::string block_label(const Block& b) {
  return std::string("kernel ") + b.kernel->name + ", block (" + std::to_string(blockIdx.x) +
         "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// From a fiber: fail the block and never come back.
[[noreturn]] void fiber_fault(const std::string& what) {
  Emulator& e = emu();
  Block& b = *e.block;
  Fiber& f = e.fibers[e.current];
  if (b.fault.empty()) b.fault = block_label(b) + ", " + thread_label(f) + ": " + what;
  f.state = State::kDone;
  e.stacks_abandoned = true;
  leave_fiber_forever();
}

void* initial_stack_pointer(Fiber& f) {
  if (f.stack_bottom == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
      std::fprintf(stderr, "cuda emulator: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(base, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    f.stack_bottom = static_cast<unsigned char*>(base) + page;
  }
  auto top = reinterpret_cast<uintptr_t>(f.stack_bottom + kStackBytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // return address slot of fiber_main: entered with rsp = 8 (mod 16), as by a call
  *--sp = reinterpret_cast<uint64_t>(&facedeblur_emulator_fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;           // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t{0x1f80} | (uint64_t{0x037f} << 32);  // default MXCSR, x87 control word
  return sp;
}

// ---- shared memory ----

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

void check_guards(Block& b) {
  const unsigned char* a = emu().arena;
  const size_t end = std::min(kArenaBytes, b.used + kGuard);
  // Allocations in address order: the dynamic area, then the statics.
  struct Span {
    size_t begin, end;
    std::string what;
  };
  std::vector<Span> spans;
  spans.push_back({kGuard, kGuard + b.dynamic_bytes,
                   "dynamic shared memory (" + std::to_string(b.dynamic_bytes) +
                       " bytes requested at launch)"});
  for (const SharedVar& v : b.statics) {
    spans.push_back({v.offset, v.offset + v.bytes,
                     "the static shared variable declared at " + site(v.where) + " (" +
                         std::to_string(v.bytes) + " bytes)"});
  }
  size_t pos = 0;
  for (size_t i = 0; i <= spans.size(); ++i) {
    const size_t gap_end = i < spans.size() ? spans[i].begin : end;
    for (size_t k = pos; k < gap_end; ++k) {
      if (a[k] == kPoison) continue;
      // Closer to the end of the previous span: an overrun; else an underrun of the next.
      const bool overrun = i > 0 && (i == spans.size() || k - pos < gap_end - k);
      const Span& s = overrun ? spans[i - 1] : spans[i];
      const size_t distance = overrun ? k - s.end + 1 : s.begin - k;
      b.fault = block_label(b) + ": shared memory written " + std::to_string(distance) +
                (overrun ? " byte(s) past the end of " : " byte(s) before the start of ") +
                s.what;
      return;
    }
    if (i < spans.size()) pos = spans[i].end;
  }
}

size_t static_bytes(const Block& b) {
  size_t total = 0;
  for (const SharedVar& v : b.statics) total += v.bytes;
  return total;
}

// ---- the block scheduler ----

int warp_count(const Block& b) { return (b.threads + 31) / 32; }

// No fiber is ready: release a barrier, finish, or diagnose a deadlock. Returns whether the
// block goes on.
bool resolve_stall(Emulator& e, Block& b) {
  std::vector<int> at_barrier, at_warp;
  for (int t = 0; t < b.threads; ++t) {
    const State s = e.fibers[t].state;
    if (s == State::kBarrier) at_barrier.push_back(t);
    if (s == State::kWarp) at_warp.push_back(t);
  }
  if (at_barrier.empty() && at_warp.empty()) return false;  // every thread has exited
  if (at_warp.empty()) {
    const std::source_location& first = e.fibers[at_barrier[0]].where;
    std::vector<int> elsewhere;
    for (int t : at_barrier) {
      if (!same_site(e.fibers[t].where, first)) elsewhere.push_back(t);
    }
    if (!elsewhere.empty()) {
      std::vector<int> here;
      for (int t : at_barrier) {
        if (same_site(e.fibers[t].where, first)) here.push_back(t);
      }
      b.fault = block_label(b) + ": divergent __syncthreads: threads " + ranges(here) +
                " wait at " + site(first) + ", threads " + ranges(elsewhere) + " at " +
                site(e.fibers[elsewhere[0]].where);
      return false;
    }
    for (int t : at_barrier) e.fibers[t].state = State::kReady;
    return true;
  }
  // Deadlock: describe each waiting warp collective and the lanes it misses.
  std::string what = block_label(b) + ": deadlock:";
  std::vector<bool> described(b.threads, false);
  for (int t : at_warp) {
    if (described[t]) continue;
    const Fiber& f = e.fibers[t];
    const int warp = t / 32;
    std::vector<int> waiting, missing;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      const int u = warp * 32 + lane;
      if (u < b.threads && e.fibers[u].state == State::kWarp &&
          same_site(e.fibers[u].where, f.where)) {
        waiting.push_back(lane);
        described[u] = true;
      } else {
        missing.push_back(lane);
      }
    }
    what += std::string(" warp ") + std::to_string(warp) + " lanes " + ranges(waiting) +
            " wait at " + op_name(f.op) + " (" + site(f.where) + ") for lanes " +
            ranges(missing) + " named in its mask, which never arrive;";
  }
  if (!at_barrier.empty()) {
    what += " threads " + ranges(at_barrier) + " wait at __syncthreads (" +
            site(e.fibers[at_barrier[0]].where) + ")";
  }
  b.fault = what;
  return false;
}

void run_block(Emulator& e, Block& b) {
  e.block = &b;
  const int n = b.threads;
  if (e.stacks_abandoned) {
#if defined(FACEDEBLUR_EMULATOR_ASAN)
    for (Fiber& f : e.fibers) {
      if (f.stack_bottom != nullptr) __asan_unpoison_memory_region(f.stack_bottom, kStackBytes);
    }
#endif
    e.stacks_abandoned = false;
  }
  for (int t = 0; t < n; ++t) {
    Fiber& f = e.fibers[t];
    f.idx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.state = State::kReady;
    f.next_shared_decl = 0;
    f.asan_fake_stack = nullptr;
    f.sp = initial_stack_pointer(f);
  }
  std::memset(e.arena, kPoison, std::min(kArenaBytes, e.arena_dirty));
  b.used = kGuard + b.dynamic_bytes;
  const int warps = warp_count(b);
  std::vector<int> order;
  bool new_phase = true;
  int ahead = 0;
  while (b.fault.empty()) {
    bool any_ready = false;
    for (int t = 0; t < n && !any_ready; ++t) any_ready = e.fibers[t].state == State::kReady;
    if (!any_ready) {
      if (!resolve_stall(e, b)) break;
      new_phase = true;
      continue;
    }
    auto run = [&](int t) {
      if (b.fault.empty() && e.fibers[t].state == State::kReady) resume(e, t);
    };
    switch (e.schedule) {
      case Schedule::kForward:
        for (int t = 0; t < n; ++t) run(t);
        break;
      case Schedule::kReverse:
        for (int t = n - 1; t >= 0; --t) run(t);
        break;
      case Schedule::kRandom:
        order.clear();
        for (int t = 0; t < n; ++t) {
          if (e.fibers[t].state == State::kReady) order.push_back(t);
        }
        std::shuffle(order.begin(), order.end(), e.rng);
        for (int t : order) run(t);
        break;
      case Schedule::kWarpAhead: {
        if (new_phase) ahead = static_cast<int>(e.rng() % static_cast<uint64_t>(warps));
        const int lo = ahead * 32, hi = std::min(n, lo + 32);
        for (bool progress = true; progress && b.fault.empty();) {
          progress = false;
          for (int t = lo; t < hi; ++t) {
            if (e.fibers[t].state == State::kReady) {
              run(t);
              progress = true;
            }
          }
        }
        for (int t = 0; t < n; ++t) {
          if (t < lo || t >= hi) run(t);
        }
        break;
      }
    }
    new_phase = false;
  }
  if (b.fault.empty()) check_guards(b);
  e.arena_dirty = std::min(kArenaBytes, b.used + 2 * kGuard);
  e.block = nullptr;
}

void fail_launch(Emulator& e, cudaError_t error, const std::string& why) {
  e.last_error = error;
  e.message = why;
}

// Checks a launch's shared memory against the limits; static_size may not be known yet (0).
bool smem_ok(Emulator& e, const KernelInfo& k, size_t static_size, size_t dynamic_size) {
  const auto attr = e.max_dynamic_smem.find(k.address);
  const size_t max_dynamic = attr != e.max_dynamic_smem.end()
                                 ? static_cast<size_t>(attr->second)
                                 : (static_size < kDefaultSmem ? kDefaultSmem - static_size : 0);
  std::string why;
  if (static_size > kDefaultSmem) {
    why = std::to_string(static_size) + " bytes of static shared memory (the limit is " +
          std::to_string(kDefaultSmem) + ")";
  } else if (dynamic_size > max_dynamic) {
    why = std::to_string(dynamic_size) +
          " bytes of dynamic shared memory, over the kernel's maximum of " +
          std::to_string(max_dynamic) +
          (attr == e.max_dynamic_smem.end()
               ? " (more than 48 KB needs cudaFuncAttributeMaxDynamicSharedMemorySize)"
               : " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  } else if (static_size + dynamic_size > kOptInSmem) {
    why = std::to_string(static_size + dynamic_size) +
          " bytes of shared memory per block (the limit is " + std::to_string(kOptInSmem) + ")";
  }
  if (why.empty()) return true;
  fail_launch(e, cudaErrorInvalidValue, std::string("launch of ") + k.name + " failed: " + why);
  return false;
}

}  // namespace

// ---- device-side entry points (called from fibers) ----

void syncthreads(const std::source_location& where) {
  Emulator& e = emu();
  Fiber& f = e.fibers[e.current];
  f.state = State::kBarrier;
  f.where = where;
  yield_to_scheduler();
}

int lane_id() { return emu().current % 32; }

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const std::source_location& where) {
  Emulator& e = emu();
  const Block& b = *e.block;
  const int t = e.current;
  Fiber& f = e.fibers[t];
  const int lane = t % 32, warp = t / 32;
  const std::string call = std::string(op_name(op)) + " at " + site(where);
  if (!(mask >> lane & 1u)) fiber_fault(call + ": the mask does not name the calling lane");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fiber_fault(call + ": width " + std::to_string(width) + " is not a power of 2 up to 32");
  }
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && warp * 32 + l >= b.threads) {
      fiber_fault(call + ": the mask names lane " + std::to_string(l) +
                  ", which does not exist in a block of " + std::to_string(b.threads) +
                  " threads");
    }
  }
  f.state = State::kWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.where = where;
  bool complete = true;
  for (int l = 0; l < 32 && complete; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& g = e.fibers[warp * 32 + l];
    if (g.state != State::kWarp) {
      complete = false;
    } else if (g.op != op || g.mask != mask || !same_site(g.where, where)) {
      fiber_fault(call + " (mask " + std::to_string(mask) + "): lane " + std::to_string(l) +
                  " named in the mask waits at " + op_name(g.op) + " at " + site(g.where) +
                  " (mask " + std::to_string(g.mask) + ")");
    }
  }
  if (complete) {
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) ballot |= (e.fibers[warp * 32 + l].value != 0 ? 1ull : 0ull) << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& g = e.fibers[warp * 32 + l];
      const int segment = l & ~(width - 1), in_segment = l & (width - 1);
      int src = l;
      switch (op) {
        case WarpOp::kShfl: src = segment + (arg & (width - 1)); break;
        case WarpOp::kShflUp: src = in_segment >= arg ? l - arg : l; break;
        case WarpOp::kShflDown: src = in_segment + arg < width ? l + arg : l; break;
        case WarpOp::kShflXor: {
          const int x = l ^ arg;
          src = (x >= 0 && x < 32 && (x & ~(width - 1)) <= segment) ? x : l;
          break;
        }
        case WarpOp::kBallot:
        case WarpOp::kSyncwarp: break;
      }
      if (op == WarpOp::kBallot) {
        g.result = ballot;
      } else if (!(mask >> src & 1u)) {
        fiber_fault(call + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                    ", which the mask does not name");
      } else {
        g.result = e.fibers[warp * 32 + src].value;
      }
    }
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) e.fibers[warp * 32 + l].state = State::kReady;
    }
  }
  yield_to_scheduler();
  return f.result;
}

void* dynamic_shared_memory() { return emu().arena + kGuard; }

void* static_shared_memory(size_t bytes, size_t align, const std::source_location& where) {
  Emulator& e = emu();
  Block& b = *e.block;
  Fiber& f = e.fibers[e.current];
  const size_t index = f.next_shared_decl++;
  if (index < b.statics.size()) {
    const SharedVar& v = b.statics[index];
    if (v.bytes != bytes || !same_site(v.where, where)) {
      fiber_fault("static shared variable #" + std::to_string(index) + " declared at " +
                  site(where) + " (" + std::to_string(bytes) + " bytes), but another thread's is at " +
                  site(v.where) + " (" + std::to_string(v.bytes) + " bytes)");
    }
    return e.arena + v.offset;
  }
  const size_t offset = align_up(b.used + kGuard, std::max<size_t>(align, 16));
  if (offset + bytes + kGuard > kArenaBytes) {
    fiber_fault("static shared memory beyond " + std::to_string(kArenaBytes) + " bytes");
  }
  b.statics.push_back({offset, bytes, where});
  b.used = offset + bytes;
  return e.arena + offset;
}

const char* kernel_name_from_signature(const char* pretty_function) {
  // "const char* ...kernel_name() [with auto Kernel = NAME]"
  std::string s = pretty_function;
  const size_t at = s.find("Kernel = ");
  if (at != std::string::npos && s.back() == ']') s = s.substr(at + 9, s.size() - at - 10);
  return strdup(s.c_str());
}

cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  Emulator& e = emu();
  const auto known = e.static_smem.find(kernel);
  const size_t static_size = known != e.static_smem.end() ? known->second : 0;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) + static_size > kOptInSmem) {
    fail_launch(e, cudaErrorInvalidValue,
                "cudaFuncSetAttribute: " + std::to_string(value) +
                    " bytes of dynamic shared memory is over the limit of " +
                    std::to_string(kOptInSmem - static_size));
    return cudaErrorInvalidValue;
  }
  e.max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

void launch(const KernelInfo& kernel, dim3 grid, dim3 block, size_t dynamic_smem,
            void (*body)(void*), void* params) {
  Emulator& e = emu();
  e.launch_log += std::string(kernel.name) + " grid=(" + std::to_string(grid.x) + "," +
                  std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block=(" +
                  std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                  std::to_string(block.z) + ") smem=" + std::to_string(dynamic_smem) + "\n";
  if (e.sticky_error != cudaSuccess) {
    e.last_error = e.sticky_error;
    return;
  }
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  std::string bad;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    bad = "an empty grid or block";
  } else if (threads > kMaxThreadsPerBlock || block.x > kMaxBlockXY || block.y > kMaxBlockXY ||
             block.z > kMaxBlockZ) {
    bad = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
          std::to_string(block.z) + ") has more than 1024 threads or a dimension over its limit";
  } else if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    bad = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
          std::to_string(grid.z) + ") is over the limits (2^31 - 1, 65535, 65535)";
  }
  if (!bad.empty()) {
    fail_launch(e, cudaErrorInvalidConfiguration,
                std::string("launch of ") + kernel.name + " failed: " + bad);
    return;
  }
  const auto known = e.static_smem.find(kernel.address);
  const bool static_known = known != e.static_smem.end();
  if (!smem_ok(e, kernel, static_known ? known->second : 0, dynamic_smem)) return;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  if (e.schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (e.schedule == Schedule::kRandom) std::shuffle(order.begin(), order.end(), e.rng);
  gridDim = grid;
  blockDim = block;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t id = order[i];
    blockIdx = {static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                static_cast<unsigned>(id / (uint64_t{grid.x} * grid.y))};
    Block b;
    b.kernel = &kernel;
    b.body = body;
    b.params = params;
    b.threads = static_cast<int>(threads);
    b.dynamic_bytes = dynamic_smem;
    run_block(e, b);
    if (!b.fault.empty()) {
      e.sticky_error = cudaErrorLaunchFailure;
      fail_launch(e, cudaErrorLaunchFailure, b.fault);
      return;
    }
    if (!static_known && i == 0) {
      // The static shared memory is known once a block has declared it: check it now (the
      // first block already ran; its writes do not matter to a failed launch).
      e.static_smem[kernel.address] = static_bytes(b);
      if (!smem_ok(e, kernel, static_bytes(b), dynamic_smem)) return;
    }
  }
}

}  // namespace facedeblur::emulator

extern "C" [[noreturn]] void facedeblur_emulator_fiber_main() {
  using namespace facedeblur::emulator;
  Emulator& e = emu();
#if defined(FACEDEBLUR_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_stack_bottom, &e.scheduler_stack_size);
#endif
  e.block->body(e.block->params);
  e.fibers[e.current].state = State::kDone;
  leave_fiber_forever();
}

// ---- runtime API subset ----

cudaError_t cudaGetLastError() {
  auto& e = facedeblur::emulator::emu();
  const cudaError_t err = e.last_error;
  e.last_error = e.sticky_error;
  return err;
}

cudaError_t cudaPeekAtLastError() { return facedeblur::emulator::emu().last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  auto& e = facedeblur::emulator::emu();
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = e.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// ---- control, for the tests (ctypes) ----

extern "C" {

// mode: 0 forward, 1 reverse, 2 random, 3 warp_ahead; seed: of the random choices.
int facedeblur_emulator_set_schedule(int mode, uint64_t seed) {
  using facedeblur::emulator::Schedule;
  if (mode < 0 || mode > 3) return -1;
  auto& e = facedeblur::emulator::emu();
  e.schedule = static_cast<Schedule>(mode);
  e.rng.seed(seed);
  return 0;
}

// What cudaDevAttrMultiProcessorCount reports (launch plans size their splits by it).
void facedeblur_emulator_set_sm_count(int count) { facedeblur::emulator::emu().sm_count = count; }

// Clears the errors (sticky ones too), the message and the launch log.
void facedeblur_emulator_reset() {
  auto& e = facedeblur::emulator::emu();
  e.last_error = e.sticky_error = cudaSuccess;
  e.message.clear();
  e.launch_log.clear();
}

// Why the last launch failed ("" when none did since the reset).
const char* facedeblur_emulator_message() { return facedeblur::emulator::emu().message.c_str(); }

// One line per launch since the reset: "kernel grid=(x,y,z) block=(x,y,z) smem=bytes".
const char* facedeblur_emulator_launch_log() {
  return facedeblur::emulator::emu().launch_log.c_str();
}

}  // extern "C"
