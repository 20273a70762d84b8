// bench/nbd_rtt.cc — synchronous REQ_ONE BLOCK_STATUS round trips, the way
// `qemu-img map` asks (one request at a time, REQ_ONE, at most INT_MAX
// bytes rounded down to 512, each request starting where the last extent
// ended), over libnbd against any NBD server. Not a test; used by
// bench/shim_rtt_bench.sh.
//
//   nbd_rtt URI REQUESTS   -> "requests N mean_us M median_us P"
//
// Walks the disk from 0, wrapping at its end, until REQUESTS requests
// were answered. Exits non-zero on any error.
#include <libnbd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

struct Walk {
  uint64_t next = 0;  // end of the extent just returned
};

int OnExtent(void* user, const char* context, uint64_t offset,
             uint32_t* entries, size_t n, int* error) {
  (void)context;
  (void)error;
  auto* w = static_cast<Walk*>(user);
  if (n >= 2) w->next = offset + entries[0];
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s URI REQUESTS\n", argv[0]);
    return 2;
  }
  const int64_t requests = std::strtoll(argv[2], nullptr, 10);
  nbd_handle* h = nbd_create();
  if (h == nullptr || nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) ||
      nbd_connect_uri(h, argv[1]) == -1) {
    std::fprintf(stderr, "connect: %s\n", nbd_get_error());
    return 1;
  }
  const int64_t size = nbd_get_size(h);
  if (size <= 0) {
    std::fprintf(stderr, "size: %s\n", nbd_get_error());
    return 1;
  }
  std::vector<double> us;
  us.reserve(static_cast<size_t>(requests));
  Walk w;
  uint64_t offset = 0;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (int64_t i = 0; i < requests; ++i) {
    const uint64_t left = static_cast<uint64_t>(size) - offset;
    const uint64_t count = std::min<uint64_t>(left, 0x7fffffffu & ~511u);
    w.next = offset;
    const auto t0 = Clock::now();
    if (nbd_block_status(
            h, count, offset,
            (nbd_extent_callback){
                .callback = OnExtent, .user_data = &w, .free = nullptr},
            LIBNBD_CMD_FLAG_REQ_ONE) == -1) {
      std::fprintf(stderr, "block_status at %" PRIu64 ": %s\n", offset,
                   nbd_get_error());
      return 1;
    }
    us.push_back(
        std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if (w.next <= offset) {
      std::fprintf(stderr, "no progress at %" PRIu64 "\n", offset);
      return 1;
    }
    offset = w.next >= static_cast<uint64_t>(size) ? 0 : w.next;
  }
  const double total =
      std::chrono::duration<double, std::micro>(Clock::now() - start).count();
  std::sort(us.begin(), us.end());
  std::printf("requests %ld mean_us %.2f median_us %.2f\n", requests,
              total / static_cast<double>(requests), us[us.size() / 2]);
  nbd_shutdown(h, 0);
  nbd_close(h);
  return 0;
}
