// Runs a Metal dispatch on the CPU: one fiber (ucontext) per thread of a threadgroup.
//
// Threadgroups run one after another. Inside a group every thread is a fiber; a fiber
// runs until it reaches threadgroup_barrier() or a SIMD-group function, then waits
// there. When all fibers wait, the scheduler releases the barrier (every thread of
// the group must be there) or completes the SIMD function (every lane of the SIMD
// group must call the same one), and the fibers go on. Anything else (a thread that
// exits while others wait, lanes that call different SIMD functions) is an error.
// The whole dispatch runs twice, threads and groups in ascending and then descending
// order; outputs that differ between the two runs reveal a missing barrier or a race.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace emu {

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "emulator: %s\n", msg.c_str());
  std::exit(3);
}

struct Dim3 {
  unsigned x, y, z;
};

struct Lane;
using Collective = void (*)(Lane** lanes, int n);

enum class State { Ready, AtBarrier, AtSimd, Done };

// One emulated thread: its attributes and its fiber.
struct Lane {
  Dim3 pos_in_grid, pos_in_group, group_pos;
  unsigned index_in_group, simd_lane, simd_group;
  State state;
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // left uninitialized: only touched pages cost memory
  // A pending SIMD-group function: the operation, this lane's value and argument.
  Collective op;
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
  unsigned arg;
};

constexpr unsigned kSimdWidth = 32;
constexpr size_t kStackBytes = 256 * 1024;

using Body = std::function<void(const Lane&)>;

class Scheduler {
 public:
  Scheduler(Dim3 grid, Dim3 group, Body body) : grid_(grid), group_(group), body_(body) {
    if (grid.x % group.x || grid.y % group.y || grid.z % group.z) {
      fail("the grid must be a whole number of threadgroups (non-uniform groups are "
           "not emulated)");
    }
    lanes_.resize(size_t(group.x) * group.y * group.z);
    for (auto& lane : lanes_) lane.stack.reset(new char[kStackBytes]);
  }

  void run(bool reverse) {
    Dim3 count{grid_.x / group_.x, grid_.y / group_.y, grid_.z / group_.z};
    size_t total = size_t(count.x) * count.y * count.z;
    for (size_t i = 0; i < total; ++i) {
      size_t g = reverse ? total - 1 - i : i;
      run_group(Dim3{unsigned(g % count.x), unsigned(g / count.x % count.y),
                     unsigned(g / count.x / count.y)},
                reverse);
    }
  }

  // Called from a fiber: wait at a barrier or a SIMD function, then go on.
  void wait(State why) {
    current_->state = why;
    swapcontext(&current_->ctx, &main_);
  }

  Lane* current() { return current_; }

 private:
  void run_group(Dim3 gpos, bool reverse) {
    for (unsigned i = 0; i < lanes_.size(); ++i) start_lane(lanes_[i], gpos, i);
    for (;;) {
      for (size_t k = 0; k < lanes_.size(); ++k) {
        Lane& lane = lanes_[reverse ? lanes_.size() - 1 - k : k];
        if (lane.state != State::Ready) continue;
        current_ = &lane;
        swapcontext(&main_, &lane.ctx);
      }
      if (count(State::Done) == lanes_.size()) return;
      if (complete_simd_functions() || release_barrier()) continue;
      fail(stuck_message());
    }
  }

  void start_lane(Lane& lane, Dim3 gpos, unsigned i) {
    Dim3 local{i % group_.x, i / group_.x % group_.y, i / group_.x / group_.y};
    lane.group_pos = gpos;
    lane.pos_in_group = local;
    lane.pos_in_grid = Dim3{gpos.x * group_.x + local.x, gpos.y * group_.y + local.y,
                            gpos.z * group_.z + local.z};
    lane.index_in_group = i;
    lane.simd_lane = i % kSimdWidth;
    lane.simd_group = i / kSimdWidth;
    lane.state = State::Ready;
    getcontext(&lane.ctx);
    lane.ctx.uc_stack.ss_sp = lane.stack.get();
    lane.ctx.uc_stack.ss_size = kStackBytes;
    lane.ctx.uc_link = &main_;
    makecontext(&lane.ctx, &Scheduler::trampoline, 0);
  }

  static void trampoline();

  size_t count(State s) const {
    size_t n = 0;
    for (const auto& lane : lanes_) n += lane.state == s;
    return n;
  }

  // Completes every SIMD function that all lanes of its SIMD group are waiting at.
  bool complete_simd_functions() {
    bool any = false;
    for (size_t first = 0; first < lanes_.size(); first += kSimdWidth) {
      size_t n = std::min<size_t>(kSimdWidth, lanes_.size() - first);
      Lane* group[kSimdWidth];
      size_t waiting = 0, done = 0;
      for (size_t i = 0; i < n; ++i) {
        group[i] = &lanes_[first + i];
        waiting += group[i]->state == State::AtSimd;
        done += group[i]->state == State::Done;
      }
      if (waiting == 0) continue;
      unsigned sg = unsigned(first / kSimdWidth);
      if (done) fail("SIMD group " + std::to_string(sg) + ": a SIMD function was called "
                     "after some lanes exited (divergent SIMD functions are not emulated)");
      if (waiting < n) continue;
      for (size_t i = 1; i < n; ++i) {
        if (group[i]->op != group[0]->op) {
          fail("SIMD group " + std::to_string(sg) + ": lanes called different SIMD functions");
        }
      }
      group[0]->op(group, int(n));
      for (size_t i = 0; i < n; ++i) group[i]->state = State::Ready;
      any = true;
    }
    return any;
  }

  bool release_barrier() {
    if (count(State::AtBarrier) != lanes_.size()) return false;
    for (auto& lane : lanes_) lane.state = State::Ready;
    return true;
  }

  std::string stuck_message() const {
    return "threadgroup stuck: " + std::to_string(count(State::AtBarrier)) +
           " threads at threadgroup_barrier, " + std::to_string(count(State::AtSimd)) +
           " in SIMD functions, " + std::to_string(count(State::Done)) +
           " exited (every thread of the group must reach each barrier)";
  }

  Dim3 grid_, group_;
  Body body_;
  std::vector<Lane> lanes_;
  ucontext_t main_;
  Lane* current_ = nullptr;
};

inline Scheduler*& active() {
  static Scheduler* scheduler = nullptr;
  return scheduler;
}

inline void Scheduler::trampoline() {
  Scheduler* s = active();
  Lane* lane = s->current_;
  s->body_(*lane);
  lane->state = State::Done;
}

// Called by a lane: hand `value` to a SIMD-group function and wait for the result.
template <typename T>
T collective(T value, unsigned arg, Collective op) {
  static_assert(sizeof(T) <= 16, "SIMD value too large");
  Lane* lane = active()->current();
  std::memcpy(lane->in, &value, sizeof(T));
  lane->arg = arg;
  lane->op = op;
  active()->wait(State::AtSimd);
  T result;
  std::memcpy(&result, lane->out, sizeof(T));
  return result;
}

template <typename T>
T lane_value(const Lane* lane) {
  T value;
  std::memcpy(&value, lane->in, sizeof(T));
  return value;
}

template <typename T>
void set_result(Lane* lane, T value) {
  std::memcpy(lane->out, &value, sizeof(T));
}

// Device buffers, each placed so that it ends right before an inaccessible page:
// reading or writing past its end crashes the emulated dispatch.
class Buffers {
 public:
  explicit Buffers(const char* path) {
    std::ifstream f(path, std::ios::binary);
    uint32_t n = 0;
    f.read(reinterpret_cast<char*>(&n), sizeof n);
    for (uint32_t i = 0; i < n; ++i) {
      uint64_t bytes = 0;
      f.read(reinterpret_cast<char*>(&bytes), sizeof bytes);
      void* p = guarded(bytes);
      f.read(static_cast<char*>(p), std::streamsize(bytes));
      inputs_.push_back(p);
    }
    if (!f) fail(std::string("cannot read inputs from ") + path);
  }

  template <typename T>
  const T* input(size_t i) const {
    return static_cast<const T*>(inputs_.at(i));
  }

  template <typename T>
  T* output(uint64_t bytes) {
    outputs_.push_back({guarded(bytes), bytes});
    return static_cast<T*>(outputs_.back().first);
  }

  // Runs the dispatch in both orders; fails if the outputs differ.
  void run(Dim3 grid, Dim3 group, Body body) {
    Scheduler scheduler(grid, group, body);
    active() = &scheduler;
    std::vector<std::string> first;
    for (bool reverse : {false, true}) {
      for (auto& o : outputs_) std::memset(o.first, 0xff, o.second);
      scheduler.run(reverse);
      for (size_t i = 0; i < outputs_.size(); ++i) {
        std::string bytes(static_cast<char*>(outputs_[i].first), outputs_[i].second);
        if (!reverse) {
          first.push_back(bytes);
        } else if (bytes != first[i]) {
          fail("output " + std::to_string(i) + " depends on the order threads run in "
               "(a missing threadgroup_barrier, or threads racing on memory)");
        }
      }
    }
  }

  void save(const char* path) const {
    std::ofstream f(path, std::ios::binary);
    for (const auto& o : outputs_) f.write(static_cast<const char*>(o.first), o.second);
  }

 private:
  static void* guarded(uint64_t bytes) {
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    size_t span = (bytes + page - 1) / page * page;
    auto* base = static_cast<char*>(
        mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) fail("out of memory");
    mprotect(base + span, page, PROT_NONE);
    return base + span - bytes;
  }

  std::vector<void*> inputs_;
  std::vector<std::pair<void*, uint64_t>> outputs_;
};

}  // namespace emu
