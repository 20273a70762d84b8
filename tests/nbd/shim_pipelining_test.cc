// tests/nbd/shim_pipelining_test.cc — many reads in flight through the NBD
// shim on one client connection. The upstream is nbdkit's pattern plugin
// behind its delay filter (every read waits `kDelay`), reached through the
// libnbd Upstream; the client is libnbd's aio API. Checks that the shim
// overlaps the reads (it starts each on the upstream's asynchronous API and
// no thread waits for one), that every byte equals the upstream's, and that
// a client hanging up with reads in flight, then the server shutting down
// while they complete, is safe (run under ASan/TSan too). Writes (nbdkit
// memory behind delay-write) overlap the same way, and each acknowledged
// write has dropped the cached "hole" over its range.
#include <libnbd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/config.pb.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/shim_rig.h"

namespace blockmeta {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr int kReads = 16;  // the shim's default max_inflight_requests
constexpr uint32_t kReadSize = kMiB;
const absl::Duration kDelay = absl::Milliseconds(400);

struct NbdCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, NbdCloser>;

Handle Connect(const std::string& uri) {
  Handle h(nbd_create());
  if (h == nullptr) return nullptr;
  nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (nbd_connect_uri(h.get(), uri.c_str()) == -1) {
    ADD_FAILURE() << "connect " << uri << ": " << nbd_get_error();
    return nullptr;
  }
  return h;
}

// Issues kReads reads of kReadSize at 1 MiB steps from `first`, all at
// once, and waits for every one; returns the bytes read (empty on error).
std::vector<std::string> ReadAll(nbd_handle* h, uint64_t first,
                                 absl::Duration* took) {
  std::vector<std::string> bufs(kReads, std::string(kReadSize, '\0'));
  std::vector<int64_t> cookies;
  const absl::Time t0 = absl::Now();
  for (int i = 0; i < kReads; ++i) {
    int64_t c = nbd_aio_pread(h, bufs[i].data(), kReadSize,
                              first + static_cast<uint64_t>(i) * kMiB,
                              NBD_NULL_COMPLETION, 0);
    if (c == -1) {
      ADD_FAILURE() << "aio_pread: " << nbd_get_error();
      return {};
    }
    cookies.push_back(c);
  }
  const absl::Time deadline = t0 + absl::Seconds(60);
  for (int64_t c : cookies) {
    for (;;) {
      const int done = nbd_aio_command_completed(h, c);
      if (done == 1) break;
      if (done == -1) {
        ADD_FAILURE() << "read failed: " << nbd_get_error();
        return {};
      }
      if (absl::Now() > deadline || nbd_poll(h, 1000) == -1) {
        ADD_FAILURE() << "reads did not finish: " << nbd_get_error();
        return {};
      }
    }
  }
  *took = absl::Now() - t0;
  return bufs;
}

class ShimPipeliningTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Start(
        {"nbdkit", "-f", "-U", "{sock}", "--filter=delay", "pattern", "64M",
         absl::StrCat("delay-read=", absl::ToInt64Milliseconds(kDelay), "ms")});
  }
  void Start(std::vector<std::string> argv) {
    // One worker thread: a shim that ran each read on a pool thread would
    // serialize them and fail the overlap check.
    blockmeta::v1::NbdShimConfig shim;
    shim.set_worker_threads(1);
    auto rig = testing::StartShimRig(std::move(argv), "disk", shim);
    ASSERT_TRUE(rig.ok()) << rig.status();
    rig_ = *std::move(rig);
  }
  std::string ShimUri() const { return rig_->Uri(); }

  std::unique_ptr<testing::ShimRig> rig_;
};

TEST_F(ShimPipeliningTest, ReadsOnOneConnectionOverlapAndMatchTheUpstream) {
  Handle shim = Connect(ShimUri());
  ASSERT_NE(shim, nullptr);
  absl::Duration through_shim;
  std::vector<std::string> got = ReadAll(shim.get(), 3 * kMiB, &through_shim);
  ASSERT_EQ(got.size(), static_cast<size_t>(kReads));
  // Serial reads would take kReads x kDelay; overlapped ones about one
  // delay. Half the serial time is a generous bound for "they overlap".
  EXPECT_LT(through_shim, kDelay * (kReads / 2))
      << "reads through the shim did not overlap";

  Handle direct = Connect(rig_->process->uri());
  ASSERT_NE(direct, nullptr);
  absl::Duration direct_took;
  std::vector<std::string> want = ReadAll(direct.get(), 3 * kMiB, &direct_took);
  ASSERT_EQ(want.size(), static_cast<size_t>(kReads));
  for (int i = 0; i < kReads; ++i) {
    EXPECT_TRUE(got[i] == want[i]) << "read " << i << " differs";
  }
  // The pattern plugin's content: each 8-byte word is its offset, big
  // endian (so the comparison above is not of two empty answers).
  const unsigned char* p =
      reinterpret_cast<const unsigned char*>(got[kReads - 1].data());
  uint64_t word = 0;
  for (int b = 0; b < 8; ++b) word = word << 8 | p[b];
  EXPECT_EQ(word, 3 * kMiB + (kReads - 1) * kMiB);
}

TEST_F(ShimPipeliningTest, ClientLeavingWithReadsInFlightIsSafe) {
  for (int round = 0; round < 3; ++round) {
    Handle shim = Connect(ShimUri());
    ASSERT_NE(shim, nullptr);
    std::vector<std::string> bufs(kReads, std::string(kReadSize, '\0'));
    for (int i = 0; i < kReads; ++i) {
      ASSERT_NE(nbd_aio_pread(shim.get(), bufs[i].data(), kReadSize,
                              static_cast<uint64_t>(i) * kMiB,
                              NBD_NULL_COMPLETION, 0),
                -1)
          << nbd_get_error();
    }
    // Let the requests reach the shim, then hang up without reading the
    // replies: nbd_close drops the socket with the reads in flight.
    while (nbd_aio_in_flight(shim.get()) > 0 &&
           nbd_aio_get_direction(shim.get()) & LIBNBD_AIO_DIRECTION_WRITE) {
      ASSERT_NE(nbd_poll(shim.get(), 100), -1) << nbd_get_error();
    }
    shim.reset();
  }
  // The last round's reads are still on the upstream: shutting the server
  // down now must wait for their completions, not free what they use.
  rig_->server->Shutdown();
  rig_->server.reset();
  // The upstream still answers afterwards.
  std::string buf(4096, '\0');
  EXPECT_TRUE(
      rig_->upstream
          ->Pread(buf.data(), buf.size(), 0, absl::Now() + absl::Seconds(20))
          .ok());
}

// Writes: a writable upstream (memory) whose writes wait kDelay.
class ShimPipelinedWritesTest : public ShimPipeliningTest {
 protected:
  void SetUp() override {
    Start({"nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory", "64M",
           absl::StrCat("delay-write=", absl::ToInt64Milliseconds(kDelay),
                        "ms")});
  }
};

// Bytes reported as data (not hole) in [offset, offset + length).
uint64_t DataBytes(nbd_handle* h, uint64_t offset, uint64_t length) {
  uint64_t data = 0;
  uint64_t pos = offset;
  while (pos < offset + length) {
    struct Cursor {
      uint64_t* data;
      uint64_t end = 0;
    };
    Cursor c{&data};
    auto cb = [](void* u, const char* ctx, uint64_t off, uint32_t* e, size_t n,
                 int* err) -> int {
      Cursor* c = static_cast<Cursor*>(u);
      if (std::string(ctx) != LIBNBD_CONTEXT_BASE_ALLOCATION) return 0;
      c->end = off;
      for (size_t i = 0; i + 1 < n; i += 2) {
        if ((e[i + 1] & LIBNBD_STATE_HOLE) == 0) *c->data += e[i];
        c->end += e[i];
      }
      return 0;
    };
    if (nbd_block_status(h, offset + length - pos, pos,
                         nbd_extent_callback{cb, &c, nullptr}, 0) == -1) {
      ADD_FAILURE() << "block status: " << nbd_get_error();
      return 0;
    }
    if (c.end <= pos) {
      ADD_FAILURE() << "block status made no progress";
      return data;
    }
    pos = c.end;
  }
  return data;
}

TEST_F(ShimPipelinedWritesTest, WritesOverlapAndInvalidateTheCache) {
  Handle shim = Connect(ShimUri());
  ASSERT_NE(shim, nullptr);
  // Cache the fresh disk: all hole.
  ASSERT_EQ(DataBytes(shim.get(), 0, 64 * kMiB), 0u);
  std::vector<std::string> bufs;
  bufs.reserve(kReads);
  for (int i = 0; i < kReads; ++i) {
    bufs.push_back(std::string(kReadSize, static_cast<char>('a' + i)));
  }
  std::vector<int64_t> cookies;
  const absl::Time t0 = absl::Now();
  for (int i = 0; i < kReads; ++i) {
    const int64_t c =
        nbd_aio_pwrite(shim.get(), bufs[i].data(), kReadSize,
                       static_cast<uint64_t>(2 * i) * kMiB, NBD_NULL_COMPLETION,
                       nbd_can_fua(shim.get()) == 1 ? LIBNBD_CMD_FLAG_FUA : 0);
    ASSERT_NE(c, -1) << nbd_get_error();
    cookies.push_back(c);
  }
  for (int64_t c : cookies) {
    int done;
    while ((done = nbd_aio_command_completed(shim.get(), c)) == 0) {
      ASSERT_LT(absl::Now(), t0 + absl::Seconds(60));
      ASSERT_NE(nbd_poll(shim.get(), 1000), -1) << nbd_get_error();
    }
    ASSERT_EQ(done, 1) << nbd_get_error();
  }
  EXPECT_LT(absl::Now() - t0, kDelay * (kReads / 2))
      << "writes through the shim did not overlap";
  // Every write is acknowledged: the cached "hole" must be gone for each
  // written MiB (the upstream now reports it as data), and the bytes read
  // back are the ones written.
  for (int i = 0; i < kReads; ++i) {
    const uint64_t off = static_cast<uint64_t>(2 * i) * kMiB;
    EXPECT_EQ(DataBytes(shim.get(), off, kMiB), kMiB) << "write " << i;
    std::string back(kReadSize, '\0');
    ASSERT_NE(nbd_pread(shim.get(), back.data(), back.size(), off, 0), -1)
        << nbd_get_error();
    EXPECT_TRUE(back == bufs[i]) << "write " << i << " reads back different";
  }
}

}  // namespace
}  // namespace blockmeta
