// A CPU allocator for torch that keeps freed blocks for reuse (loram.block_cache).
//
// torch's default CPU allocator hands every tensor to malloc. A training step allocates and
// frees tens of gigabytes of activation-sized tensors. With glibc's heap the freed memory stays
// resident and fragments (the peak grows by a third on the benchmark's model); with a fixed
// mmap threshold every tensor gets fresh pages from the kernel, and the page faults take a
// third of the step. This allocator maps blocks of at least `min_bytes` itself and, when a
// tensor is freed, keeps its block (up to `max_idle` bytes of idle blocks) for the next tensor
// of the same size class. Smaller requests go to the allocator that was active before.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

// Eight classes per octave: a request is rounded up by less than 12.5% (the pages past the
// request are not touched, so not resident, unless a larger tensor of the class used them).
size_t size_class(size_t n) {
  size_t step = kPage;
  int top = 63 - __builtin_clzll(static_cast<unsigned long long>(n));
  if (top - 3 > 12) step = size_t{1} << (top - 3);
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_.load() || fallback_.load() == nullptr) return fallback()->allocate(n);
    const size_t size = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.find(size);
      if (it != idle_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      evict(size);
      p = map(size);
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = size;
    live_bytes_ += size;
    if (live_bytes_ + idle_bytes_ > peak_bytes_) peak_bytes_ = live_bytes_ + idle_bytes_;
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

  static void release(void* p) { get().free_block(p); }

  bool install(size_t min_bytes, size_t max_idle) {
    std::lock_guard<std::mutex> lock(mu_);
    min_bytes_ = min_bytes < kPage ? kPage : min_bytes;
    max_idle_ = max_idle;
    if (!installed_) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) fallback_ = current;
      c10::SetCPUAllocator(this, kPriority);
      installed_ = c10::GetCPUAllocator() == this;
    }
    return installed_;
  }

  bool uninstall() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!installed_) return false;
      c10::SetCPUAllocator(fallback_.load(), kPriority);
      installed_ = false;  // blocks freed from now on are unmapped, not kept
    }
    flush();
    return true;
  }

  bool installed() {
    std::lock_guard<std::mutex> lock(mu_);
    return installed_ && c10::GetCPUAllocator() == this;
  }

  // Before a new block is mapped: unmap idle blocks worth at least `need` bytes, so that the
  // mapping replaces idle memory instead of adding to it (the cache then holds about the peak
  // of live tensors, not that plus whatever sat idle at the time). The smallest class that
  // covers `need` goes first; failing one, the largest classes.
  void evict(size_t need) {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t freed = 0;
      while (freed < need && idle_bytes_ > 0) {
        auto fit = idle_.end(), largest = idle_.end();
        for (auto it = idle_.begin(); it != idle_.end(); ++it) {
          if (it->second.empty()) continue;
          if (it->first >= need - freed && (fit == idle_.end() || it->first < fit->first))
            fit = it;
          if (largest == idle_.end() || it->first > largest->first) largest = it;
        }
        auto victim = fit != idle_.end() ? fit : largest;
        if (victim == idle_.end()) break;
        drop.emplace_back(victim->second.back(), victim->first);
        victim->second.pop_back();
        idle_bytes_ -= victim->first;
        freed += victim->first;
        ++unmaps_;
      }
    }
    for (auto& d : drop) munmap(d.first, d.second);
  }

  void flush() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& kv : idle_)
        for (void* p : kv.second) drop.emplace_back(p, kv.first);
      idle_.clear();
      idle_bytes_ = 0;
    }
    for (auto& d : drop) munmap(d.first, d.second);
  }

  void stats(uint64_t* out) {
    std::lock_guard<std::mutex> lock(mu_);
    out[0] = hits_;
    out[1] = misses_;
    out[2] = unmaps_;
    out[3] = live_bytes_;
    out[4] = idle_bytes_;
    out[5] = peak_bytes_;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_bytes_ = live_bytes_ + idle_bytes_;
  }

 private:
  c10::Allocator* fallback() {
    c10::Allocator* f = fallback_.load();
    return f != nullptr ? f : c10::GetDefaultCPUAllocator();
  }

  void* map(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      flush();  // idle blocks of other sizes may be what is missing
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK_WITH(
        OutOfMemoryError, p != MAP_FAILED, "loram block cache: could not map ", size, " bytes");
    return p;
  }

  void free_block(void* p) {
    if (p == nullptr) return;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it != live_.end()) {
        size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        if (installed_ && idle_bytes_ + size <= max_idle_) {
          idle_[size].push_back(p);
          idle_bytes_ += size;
          return;
        }
        ++unmaps_;
      }
    }
    if (size == 0) {  // a small block from the fallback allocator (raw_allocate path)
      fallback()->raw_deleter()(p);
      return;
    }
    munmap(p, size);
  }

  static constexpr uint8_t kPriority = 1;  // above torch's default CPU allocator (0)
  std::mutex mu_;
  std::atomic<c10::Allocator*> fallback_{nullptr};  // written under mu_, read without it
  bool installed_ = false;
  std::atomic<size_t> min_bytes_{size_t{1} << 20};
  size_t max_idle_ = 0;
  std::unordered_map<size_t, std::vector<void*>> idle_;
  std::unordered_map<void*, size_t> live_;
  size_t idle_bytes_ = 0, live_bytes_ = 0, peak_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, unmaps_ = 0;
};

}  // namespace

extern "C" {
int loram_block_cache_install(uint64_t min_bytes, uint64_t max_idle) {
  return BlockCache::get().install(min_bytes, max_idle) ? 1 : 0;
}
int loram_block_cache_uninstall() { return BlockCache::get().uninstall() ? 1 : 0; }
int loram_block_cache_installed() { return BlockCache::get().installed() ? 1 : 0; }
void loram_block_cache_flush() { BlockCache::get().flush(); }
void loram_block_cache_stats(uint64_t* out) { BlockCache::get().stats(out); }
void loram_block_cache_reset_peak() { BlockCache::get().reset_peak(); }
}
