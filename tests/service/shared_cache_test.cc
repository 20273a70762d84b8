// tests/service/shared_cache_test.cc — the promise blockmeta is built on:
// the NBD shim and the gRPC service share ONE cache. A legacy NBD client's
// map fills it and a gRPC call is then a hit; a write through the shim
// invalidates it, so the next gRPC answer shows the write (no stale hole).
// Real parts throughout: nbdkit memory upstream, nbdinfo and qemu-io
// through the shim, a gRPC channel to the same BlockMetaServer.
#include <unistd.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::RunCommand;

constexpr uint64_t kMiB = 1 << 20;

ExtentList FromProto(const v1::GetExtentsResponse& r) {
  ExtentList out;
  for (const v1::Extent& e : r.extents()) {
    out.push_back({e.offset(), e.length(), e.nbd_flags()});
  }
  return out;
}

TEST(SharedCacheTest, ShimAndGrpcShareOneCacheAndWritesInvalidateIt) {
  auto upstream =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "64M"});
  ASSERT_TRUE(upstream.ok()) << upstream.status();
  // Short path: Unix socket paths are limited to 107 bytes.
  const std::string shim_sock =
      absl::StrCat("/tmp/bm-shim-", getpid(), ".sock");
  v1::ServerConfig c;
  c.set_grpc_listen("127.0.0.1:0");
  c.set_nbd_unix_socket(shim_sock);
  v1::ExportConfig* e = c.add_exports();
  e->set_name("mem");
  e->set_nbd_uri((*upstream)->uri());
  auto server = ::blockmeta::testing::StartServer(c);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub =
      v1::BlockMeta::NewStub(::blockmeta::testing::LoopbackChannel(**server));
  auto get = [&](v1::GetExtentsResponse* r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
    v1::GetExtentsRequest req;
    req.set_export_name("mem");
    req.set_length(64 * kMiB);
    return stub->GetExtents(&ctx, req, r);
  };
  // Wait until the upstream is connected.
  v1::GetExtentsResponse r;
  ASSERT_TRUE(::blockmeta::testing::Eventually(
      [&] { return get(&r).ok(); }, absl::Seconds(20), absl::Milliseconds(50)));
  // Start from an empty cache so the shim is what fills it.
  {
    grpc::ClientContext ctx;
    v1::InvalidateCacheRequest inv;
    v1::InvalidateCacheResponse ir;
    ASSERT_TRUE(stub->InvalidateCache(&ctx, inv, &ir).ok());
  }
  const std::string shim_uri = "nbd+unix:///mem?socket=" + shim_sock;

  // 1. A legacy client maps through the shim: the cache fills.
  absl::StatusOr<ExtentList> shim_map = NbdinfoMap(shim_uri);
  ASSERT_TRUE(shim_map.ok()) << shim_map.status();
  ASSERT_EQ(MergeAdjacent(*shim_map),
            (ExtentList{{0, 64 * kMiB, kStateHole | kStateZero}}));
  // 2. gRPC is served from what the shim's client caused to be cached.
  ASSERT_TRUE(get(&r).ok());
  EXPECT_EQ(r.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(FromProto(r), MergeAdjacent(*shim_map));

  // 3. A write through the shim invalidates before it is acknowledged...
  auto wrote = RunCommand(
      {"qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 64k", shim_uri});
  ASSERT_TRUE(wrote.ok()) << wrote.status();
  // ...so the very next gRPC answer shows the data: no stale hole.
  ASSERT_TRUE(get(&r).ok());
  EXPECT_NE(r.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  absl::StatusOr<ExtentList> direct = NbdinfoMap((*upstream)->uri());
  ASSERT_TRUE(direct.ok()) << direct.status();
  EXPECT_EQ(FromProto(r), MergeAdjacent(*direct));
  bool data_at_1m = false;
  for (const Extent& x : FromProto(r)) {
    if (x.offset <= kMiB && x.end() >= kMiB + 65536) {
      data_at_1m = (x.flags & kStateHole) == 0;
    }
  }
  EXPECT_TRUE(data_at_1m) << "the write must be visible over gRPC";
  (*server)->Shutdown(absl::Seconds(1));
  ::unlink(shim_sock.c_str());
}

}  // namespace
}  // namespace blockmeta
