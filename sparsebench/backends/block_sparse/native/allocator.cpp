// A caching CPU allocator for sparsebench (sparsebench.measure.memory.freed_memory_reused), built
// into the same extension module as the kernels of native.cpp, which binds cache_cpu_allocations.
// It has nothing to do with the kernels: it makes every backend's CPU calls reuse freed memory.
#include <c10/core/CPUAllocator.h>
#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

// Blocks of 1 MiB or more freed while it is on are kept, by exact size, for the next request of
// that size, as CUDA's caching allocator does; glibc would unmap them and the next call would
// fault every page in again. A request that no kept block fits first frees kept blocks of at least
// its size (the smallest block that large, else the largest ones), or all of them, so the resident
// memory never exceeds what was in use at some earlier moment. Smaller blocks go straight to the
// allocator it replaced. Installed at the first "on" and never uninstalled (a block may be
// released through it at any later time); off, it passes every request through and frees each of
// its blocks when released.
namespace host_cache {
constexpr size_t kMinBytes = size_t(1) << 20;

struct Cache final : c10::Allocator {
  c10::Allocator* base = nullptr;
  std::mutex mu;
  std::atomic<bool> on{false};
  std::unordered_map<void*, std::pair<size_t, c10::DataPtr>> live;  // handed out by allocate
  std::map<size_t, std::vector<c10::DataPtr>> kept;                  // freed, by size, for reuse

  static void release(void* p);

  // one kept block of that size, out of the map (caller holds mu)
  c10::DataPtr take(std::map<size_t, std::vector<c10::DataPtr>>::iterator it) {
    c10::DataPtr block = std::move(it->second.back());
    it->second.pop_back();
    if (it->second.empty()) kept.erase(it);
    return block;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || !on.load()) return base->allocate(n);
    c10::DataPtr block;
    std::vector<c10::DataPtr> drop;  // freed outside the lock
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = kept.find(n);
      if (it != kept.end()) {
        block = take(it);
      } else if (auto ge = kept.lower_bound(n); ge != kept.end()) {
        drop.push_back(take(ge));  // one kept block of n bytes or more makes room
      } else {
        for (size_t freed = 0; freed < n && !kept.empty();) {  // the largest ones first
          auto last = std::prev(kept.end());
          freed += last->first;
          drop.push_back(take(last));
        }
      }
    }
    drop.clear();
    if (!block) block = base->allocate(n);
    void* p = block.get();
    std::lock_guard<std::mutex> g(mu);
    const bool fresh = live.emplace(p, std::make_pair(n, std::move(block))).second;
    TORCH_CHECK(fresh, "cache_cpu_allocations: a block handed out twice");
    return {p, p, &Cache::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate (oneDNN's buffers) free through this
  c10::DeleterFnPtr raw_deleter() const override { return &Cache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be released at exit
  return *c;
}

void Cache::release(void* p) {
  Cache& c = cache();
  c10::DataPtr block;  // freed as it goes out of scope, after the lock, unless kept
  c10::DeleterFnPtr other = nullptr;
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.live.find(p);
    if (it == c.live.end()) {
      other = c.base->raw_deleter();  // not ours: a small block, or one from before
    } else {
      const size_t n = it->second.first;
      block = std::move(it->second.second);
      c.live.erase(it);
      if (c.on.load()) {
        c.kept[n].push_back(std::move(block));
        return;
      }
    }
  }
  if (other != nullptr) other(p);
}
}  // namespace host_cache

// on: freed blocks are kept from now on (already on: the kept ones are freed); off: requests pass
// through and the kept blocks are freed.
void cache_cpu_allocations(bool on) {
  using host_cache::cache;
  auto& c = cache();
  std::map<size_t, std::vector<c10::DataPtr>> drop;  // freed outside the lock
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.base == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      TORCH_CHECK(current->raw_deleter() != nullptr, "cache_cpu_allocations: the CPU allocator has no raw deleter");
      c.base = current;
      c10::SetCPUAllocator(&c, 255);
    }
    c.on.store(on);
    drop.swap(c.kept);
  }
}
