// tests/service/shared_cache_test.cc — the promise blockmeta is built on:
// the NBD shim and the gRPC service share ONE cache. A legacy NBD client's
// map fills it and a gRPC call is then a hit; a write through the shim
// invalidates it, so the next gRPC answer shows the write (no stale hole).
// Real parts throughout: nbdkit memory upstream, nbdinfo and qemu-io
// through the shim, a gRPC channel to the same BlockMetaServer. Also: every
// block-status call the upstream sees is in GetStats, whoever caused it
// (shim client, read-ahead, gRPC), per export and in the total alike.
#include <unistd.h>

#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
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

// Block-status requests in an nbdkit --filter=log file (the request lines;
// a reply line reads "...Extents id=").
int ExtentsCallsLogged(const std::string& log) {
  absl::StatusOr<std::string> text = RunCommand({"cat", log});
  if (!text.ok()) return -1;
  int n = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (absl::StrContains(line, " Extents id=")) ++n;
  }
  return n;
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

TEST(SharedCacheTest, GetStatsCountsEveryUpstreamCallWhoeverMadeIt) {
  ::blockmeta::testing::TempDir dir;
  const std::string log = dir.File("nbdkit.log");
  // 1 MiB of data every 2 MiB of 16 MiB: a few extents per window.
  auto upstream = NbdProcess::Start(
      {"nbdkit", "-U", "{sock}", "-f", "--filter=log", "data",
       "data=( 1 @+1048575 @+1048576 ) * 8", "size=16M", "logfile=" + log});
  ASSERT_TRUE(upstream.ok()) << upstream.status();
  const std::string shim_sock =
      absl::StrCat("/tmp/bm-shim-stats-", getpid(), ".sock");
  v1::ServerConfig c;
  c.set_grpc_listen("127.0.0.1:0");
  c.set_nbd_unix_socket(shim_sock);
  // 1 MiB windows: a whole map takes many upstream calls, some of them
  // read-ahead.
  c.mutable_cache()->set_fetch_window_bytes(kMiB);
  v1::ExportConfig* e = c.add_exports();
  e->set_name("logged");
  e->set_nbd_uri((*upstream)->uri());
  auto server = ::blockmeta::testing::StartServer(c);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = ::blockmeta::testing::LoopbackChannel(**server);
  absl::Status ready = ::blockmeta::testing::WaitExportsReady(channel, 1);
  ASSERT_TRUE(ready.ok()) << ready;
  auto stub = v1::BlockMeta::NewStub(channel);

  // 1. A legacy client maps the whole disk through the shim.
  absl::StatusOr<ExtentList> shim_map =
      NbdinfoMap("nbd+unix:///logged?socket=" + shim_sock);
  ASSERT_TRUE(shim_map.ok()) << shim_map.status();
  // 2. Forget half of it; a gRPC caller misses there.
  {
    grpc::ClientContext ctx;
    v1::InvalidateCacheRequest inv;
    inv.set_export_name("logged");
    inv.set_length(8 * kMiB);
    v1::InvalidateCacheResponse ir;
    ASSERT_TRUE(stub->InvalidateCache(&ctx, inv, &ir).ok());
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
    v1::GetExtentsRequest req;
    req.set_export_name("logged");
    req.set_length(8 * kMiB);
    v1::GetExtentsResponse r;
    ASSERT_TRUE(stub->GetExtents(&ctx, req, &r).ok());
  }
  // 3. What the upstream logged, GetStats reports: for the export and in
  // the total. (Eventually: read-ahead may still be landing.)
  uint64_t per_export = 0, total = 0;
  int logged = -1;
  const bool agree = ::blockmeta::testing::Eventually(
      [&] {
        grpc::ClientContext ctx;
        v1::GetStatsResponse stats;
        if (!stub->GetStats(&ctx, {}, &stats).ok()) return false;
        if (stats.exports_size() != 1) return false;
        per_export = stats.exports(0).upstream_calls();
        total = stats.total().upstream_calls();
        logged = ExtentsCallsLogged(log);
        return logged >= 0 && per_export == uint64_t(logged) &&
               total == per_export;
      },
      absl::Seconds(10), absl::Milliseconds(50));
  EXPECT_TRUE(agree) << "upstream logged " << logged
                     << " block-status calls; GetStats: export " << per_export
                     << ", total " << total;
  EXPECT_GE(logged, 16) << "1 MiB windows over 16 MiB, then 8 MiB again";
  // (Last: this map's own calls go to the upstream directly.)
  absl::StatusOr<ExtentList> direct = NbdinfoMap((*upstream)->uri());
  ASSERT_TRUE(direct.ok()) << direct.status();
  EXPECT_EQ(MergeAdjacent(*shim_map), MergeAdjacent(*direct));
  (*server)->Shutdown(absl::Seconds(1));
  ::unlink(shim_sock.c_str());
}

}  // namespace
}  // namespace blockmeta
