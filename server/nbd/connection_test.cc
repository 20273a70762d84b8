// server/nbd/connection_test.cc — the session engine over a real socket
// with an in-memory upstream: a BLOCK_STATUS the cache answers whole is
// answered on the connection's own thread (no hand-off), with the NBD
// reply rules, while the pool is busy; requests fed a few bytes at a time
// are reassembled; a request stalled mid-payload still lets replies out,
// then the write timeout ends the session. With real clients:
// //tests/nbd:shim_large_request_test.
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
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

// One export named `name` served from `up`. ShimExport::upstream is a
// raw pointer on this branch and a weak reference where exports are
// removed at run time; a template keeps this test valid with either.
template <typename E = nbd::ShimExport>
E Export(const std::string& name, const std::shared_ptr<Upstream>& up) {
  E e;
  e.name = name;
  if constexpr (std::is_pointer_v<decltype(e.upstream)>) {
    e.upstream = up.get();
  } else {
    e.upstream = up;
  }
  e.upstream_timeout = absl::Seconds(30);
  return e;
}

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
  auto shared = std::make_shared<GatedUpstream>();
  GatedUpstream& up = *shared;
  up.Fill(0, kBlock, 'a');
  ExtentCache cache{ExtentCache::Options()};
  blockmeta::v1::NbdShimConfig config;
  config.set_worker_threads(1);
  NbdServer server({Export("a", shared)}, &cache, config);
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

// Serves a plain FakeUpstream as export "a".
struct Served {
  explicit Served(const blockmeta::v1::NbdShimConfig& config = {})
      : up(std::make_shared<FakeUpstream>(kSize, kBlock, false)),
        cache(ExtentCache::Options()),
        server({Export("a", up)}, &cache, config),
        sock(TempSocket("engine")) {
    EXPECT_TRUE(server.Start("", sock).ok());
  }
  std::unique_ptr<RawClient> Session() {
    auto c = RawClient::ConnectUnix(sock);
    EXPECT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE((*c)->Handshake("a", true, {"base:allocation"}).ok());
    return std::move(*c);
  }
  std::shared_ptr<FakeUpstream> up;
  ExtentCache cache;
  NbdServer server;
  std::string sock;
};

// Requests that arrive a few bytes at a time (headers and payload cut
// anywhere) are reassembled exactly: the reception state machine keeps
// its place across reads.
TEST(ConnectionEngine, DripFedRequestsAreReassembled) {
  Served s;
  auto c = s.Session();
  std::string data(3 * 4096, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 13);
  const std::string bytes =
      RequestBytes(Req(nbd::kCmdWrite, 4096, data.size(), 0, 1), data) +
      RequestBytes(Req(nbd::kCmdRead, 4096, data.size(), 0, 2)) +
      RequestBytes(Req(nbd::kCmdBlockStatus, 0, kBlock, 0, 3));
  for (size_t pos = 0, step = 1; pos < bytes.size(); pos += step) {
    step = 1 + (pos * 7919) % 97;
    ASSERT_TRUE(c->Send(bytes.substr(pos, step)).ok());
    // Deliberate pacing, not a wait: the server sees the bytes in pieces.
    if (pos % 5 == 0) absl::SleepFor(absl::Microseconds(200));
  }
  // Replies may come in any order (doc/proto.md): collect them.
  bool got[4] = {false, false, false, false};
  for (int i = 0; i < 3; ++i) {
    auto r = c->ReadReply();
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_GE(r->handle, 1u);
    ASSERT_LE(r->handle, 3u);
    EXPECT_EQ(r->error, 0u) << r->handle;
    got[r->handle] = true;
  }
  EXPECT_TRUE(got[1] && got[2] && got[3]);
  auto back = c->Call(Req(nbd::kCmdRead, 4096, data.size(), 0, 4));
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->chunks.size(), 1u);
  EXPECT_EQ(back->chunks[0].data.substr(8), data);
}

// A request begun must arrive whole within the write timeout; meanwhile
// replies keep flowing: the READ pipelined before the stalled WRITE is
// answered at once, then the session ends at the timeout.
TEST(ConnectionEngine, AStalledRequestGetsRepliesThenTheWriteTimeout) {
  blockmeta::v1::NbdShimConfig config;
  config.set_write_timeout_ms(800);
  Served s(config);
  auto c = s.Session();
  const std::string payload(64 * 1024, 'w');
  ASSERT_TRUE(c->Send(RequestBytes(Req(nbd::kCmdRead, 0, 4096, 0, 1)) +
                      RequestBytes(Req(nbd::kCmdWrite, 0, payload.size(), 0, 2),
                                   payload)
                          .substr(0, 28 + 1000))
                  .ok());
  const absl::Time start = absl::Now();
  auto r = c->ReadReply();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->handle, 1u);
  EXPECT_EQ(r->error, 0u);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(700));  // not the timeout
  EXPECT_TRUE(c->WaitForClose());  // the stalled WRITE ends the session
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(700));
}

}  // namespace
}  // namespace blockmeta
