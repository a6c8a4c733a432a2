// Tiles of weight rows shared out among the threads, for the products that stream weights
// (qlinear.cpp, dense.cpp). No ISA code here.
#pragma once
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace GEMMARUN_NS {

// work(t) for every tile t in [0, ntiles). Each thread streams a region of its own (the tiles cut
// in equal runs) and, once it is drained, takes what is left of the others' from their counters,
// `taken` tiles at a time: a thread that starts late or streams slower leaves no one waiting at
// the end of a call, and each still reads one long run of memory. Two threads drawing 4 tiles at a
// time from one counter interleaved their reads and streamed the 262k x 640 int8 LM head ~8%
// slower (AMD EPYC, family 23).
template <class Work>
void for_each_tile(int64_t ntiles, int64_t taken, const Work& work) {
  const int64_t threads = at::get_num_threads();
  struct alignas(64) Counter {  // a cache line each: the owner's claims do not disturb the others'
    std::atomic<int64_t> next;
  };
  auto start_of = [&](int64_t region) { return ntiles * region / threads; };  // region r: [start_of(r), start_of(r + 1))
  thread_local std::vector<Counter> counters;
  if (static_cast<int64_t>(counters.size()) != threads) counters = std::vector<Counter>(threads);
  for (int64_t i = 0; i < threads; ++i) counters[i].next = start_of(i);
  Counter* next = counters.data();  // a local name: the workers must see this thread's counters, not their own
  at::parallel_for(0, threads, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t own = r0; own < r1; ++own)
      for (int64_t k = 0; k < threads; ++k) {
        const int64_t region = (own + k) % threads, end = start_of(region + 1);
        for (int64_t t0; (t0 = next[region].next.fetch_add(taken)) < end;)
          for (int64_t t = t0; t < std::min(t0 + taken, end); ++t) work(t);
      }
  });
}

}  // namespace GEMMARUN_NS
