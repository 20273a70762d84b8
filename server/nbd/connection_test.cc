// server/nbd/connection_test.cc — the session engine over a real socket
// with an in-memory upstream: a BLOCK_STATUS the cache answers whole is
// answered on the connection's own thread (no hand-off), with the NBD
// reply rules, while the pool is busy. Reception while replies flow is
// tested with real clients in //tests/nbd:shim_large_request_test.
#include <unistd.h>

#include <atomic>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/nbd_request.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta {
namespace {

using nbd::testing::DecodeBlockStatus;
using nbd::testing::RawClient;
using nbd::testing::Req;
using nbd::testing::RequestBytes;

constexpr uint64_t kSize = 4 << 20;
constexpr uint32_t kBlock = 64 << 10;

std::string TempSocket(const std::string& name) {
  std::string path = absl::StrCat(::testing::TempDir(), name, ".sock");
  if (path.size() > 100) path = absl::StrCat("/tmp/nbdtest-", getpid(), name);
  return path;
}

// An upstream whose block status blocks, once armed, until released: it
// holds the (single) pool worker on a miss.
class GatedUpstream : public FakeUpstream {
 public:
  GatedUpstream() : FakeUpstream(kSize, kBlock, true) {}
  absl::StatusOr<ExtentList> BlockStatus(const std::string& context,
                                         uint64_t offset, uint64_t length,
                                         absl::Time deadline) override {
    if (armed_.load()) {
      entered_.Notify();
      release_.WaitForNotification();
    }
    return FakeUpstream::BlockStatus(context, offset, length, deadline);
  }
  std::atomic<bool> armed_{false};
  absl::Notification entered_, release_;
};

// Warm hits cost no hand-off: with the only pool worker stuck in a miss,
// a BLOCK_STATUS the cache answers whole is still answered, by the
// connection itself, with the REQ_ONE rules, and counted as a hit.
TEST(NbdServerHits, WarmHitsAreAnsweredWhileThePoolIsBusy) {
  GatedUpstream up;
  up.Fill(0, kBlock, 'a');
  ExtentCache cache{ExtentCache::Options()};
  blockmeta::v1::NbdShimConfig config;
  config.set_worker_threads(1);
  NbdServer server({{"a", "", &up, false, absl::Seconds(30)}}, &cache, config);
  const std::string sock = TempSocket("hits");
  ASSERT_TRUE(server.Start("", sock).ok());
  auto connect = [&] {
    auto c = RawClient::ConnectUnix(sock);
    EXPECT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE((*c)->Handshake("a", true, {"base:allocation"}).ok());
    return std::move(*c);
  };
  auto warm = connect();
  auto r =
      warm->Call(Req(nbd::kCmdBlockStatus, 0, kBlock, nbd::kCmdFlagReqOne));
  ASSERT_TRUE(r.ok()) << r.status();  // a miss: fetches the whole disk
  // Forget the second half; the next look there is a miss that blocks.
  cache.Invalidate(CacheKey{"a", "base:allocation"}, kSize / 2, 0);
  up.armed_.store(true);
  auto cold = connect();
  ASSERT_TRUE(cold->Send(RequestBytes(Req(nbd::kCmdBlockStatus, kSize / 2,
                                          kBlock, nbd::kCmdFlagReqOne, 9)))
                  .ok());
  up.entered_.WaitForNotification();  // the pool's only worker is held
  const CacheKey key{"a", "base:allocation"};
  const uint64_t hits = cache.Counters(key).hits;
  // REQ_ONE over data then hole: exactly one descriptor, not past the
  // request. Without REQ_ONE: data, then hole, clipped to the request.
  r = warm->Call(Req(nbd::kCmdBlockStatus, kBlock / 2, 2 * kBlock,
                     nbd::kCmdFlagReqOne, 1));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->chunks.size(), 1u);
  auto d = DecodeBlockStatus(r->chunks[0].data);
  ASSERT_EQ(d.extents.size(), 1u);
  EXPECT_EQ(d.extents[0], std::make_pair(kBlock / 2, 0u));
  r = warm->Call(Req(nbd::kCmdBlockStatus, kBlock / 2, 2 * kBlock, 0, 2));
  ASSERT_TRUE(r.ok()) << r.status();
  d = DecodeBlockStatus(r->chunks[0].data);
  ASSERT_EQ(d.extents.size(), 2u);
  EXPECT_EQ(d.extents[0], std::make_pair(kBlock / 2, 0u));
  EXPECT_EQ(d.extents[1].first, 3 * kBlock / 2);
  EXPECT_EQ(cache.Counters(key).hits, hits + 2);
  up.release_.Notify();
  r = cold->ReadReply();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->handle, 9u);
  EXPECT_EQ(r->error, 0u);
  server.Shutdown();
}

}  // namespace
}  // namespace blockmeta
