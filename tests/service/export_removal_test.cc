// tests/service/export_removal_test.cc — removing an export while it is in
// use, end to end: a real BlockMetaServer (gRPC Unix socket and TCP, NBD
// shim) in front of real nbdkit upstreams made slow with the delay filter,
// with real clients: a `blockmeta map` CLI process, a gRPC MapExtents
// stream, and libnbd sessions through the shim.
//
// Covered (issue 21 item 4, issue 23 item 1):
// * RemoveExport returns within 1 s while every upstream command takes
//   10 s; the stream, the CLI's map and the shim session on the removed
//   export end at once (NOT_FOUND "was removed"; the shim closes), not when
//   the upstream answers; a re-add gets a fresh generation with no counters
//   of the old one (its late answers were dropped).
// * Exports removed and re-added over and over while read-ahead, whole-map
//   prefetch, streams, unary calls and shim sessions are in flight: every call
//   ends (OK or NOT_FOUND/UNAVAILABLE), nothing crashes. Run under
//   --config=asan to catch a use of a freed upstream, entry or fetcher.
// * AddExport gives the cause before the caller's deadline and honours
//   remove_on_failure (issue 21 item 8).
#include <libnbd.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/admin.grpc.pb.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::TempDir;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

class ExportRemovalTest : public ::testing::Test {
 protected:
  void StartServer(const v1::CacheConfig& cache = {}) {
    v1::ServerConfig c;
    c.set_grpc_listen("127.0.0.1:0");
    c.set_grpc_unix_socket(dir_.File("grpc.sock"));
    c.set_nbd_unix_socket(dir_.File("nbd.sock"));
    c.set_metrics_listen("127.0.0.1:0");
    *c.mutable_cache() = cache;
    auto created = ::blockmeta::testing::StartServer(c);
    ASSERT_TRUE(created.ok()) << created.status();
    server_ = *std::move(created);
    unix_ = grpc::CreateChannel("unix:" + dir_.File("grpc.sock"),
                                grpc::InsecureChannelCredentials());
    admin_ = v1::Admin::NewStub(unix_);
    meta_ =
        v1::BlockMeta::NewStub(::blockmeta::testing::LoopbackChannel(*server_));
  }

  // Adds `name` at `uri`, configured as `base` says otherwise.
  grpc::Status Add(const std::string& name, const std::string& uri,
                   v1::AddExportResponse* out,
                   absl::Duration deadline = absl::Seconds(20),
                   const v1::ExportConfig& base = {}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(deadline)));
    v1::AddExportRequest r;
    *r.mutable_config() = base;
    r.mutable_config()->set_name(name);
    r.mutable_config()->set_nbd_uri(uri);
    return admin_->AddExport(&ctx, r, out);
  }

  // The export's base:allocation counters in GetStats (empty when it is
  // not there).
  v1::CacheCounters BaseCounters(const std::string& name) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(10))));
    v1::GetStatsRequest r;
    r.set_export_name(name);
    v1::GetStatsResponse out;
    if (!meta_->GetStats(&ctx, r, &out).ok() || out.exports_size() != 1) {
      return {};
    }
    auto it = out.exports(0).contexts().find("base:allocation");
    return it == out.exports(0).contexts().end() ? v1::CacheCounters()
                                                 : it->second;
  }

  grpc::Status Remove(const std::string& name) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(30))));
    v1::RemoveExportRequest r;
    r.set_name(name);
    v1::RemoveExportResponse out;
    return admin_->RemoveExport(&ctx, r, &out);
  }

  // A libnbd session through the shim into `name` (nullptr on failure,
  // a test failure unless `may_fail`: the export may be gone already).
  struct nbd_handle* Session(const std::string& name, bool may_fail = false) {
    struct nbd_handle* h = nbd_create();
    if (h == nullptr) return nullptr;
    if (nbd_set_export_name(h, name.c_str()) == -1 ||
        nbd_add_meta_context(h, "base:allocation") == -1 ||
        nbd_connect_unix(h, dir_.File("nbd.sock").c_str()) == -1) {
      if (!may_fail) ADD_FAILURE() << nbd_get_error();
      nbd_close(h);
      return nullptr;
    }
    return h;
  }

  TempDir dir_;
  std::unique_ptr<BlockMetaServer> server_;
  std::shared_ptr<grpc::Channel> unix_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::unique_ptr<v1::BlockMeta::Stub> meta_;
};

// What one client saw, and when it stopped.
struct Ending {
  std::atomic<bool> done{false};
  absl::Time at;
  std::string what;
};

TEST_F(ExportRemovalTest, RemovalIsImmediateWhileTheUpstreamIsSlow) {
  // Every block-status and read command takes 10 s: far beyond every bound
  // below, so an ending that waited for the upstream cannot pass.
  auto slow =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=delay",
                         "data", "data=( 1 @+65535 ) * 500", "size=32M",
                         "delay-extents=10000ms", "delay-read=10000ms"});
  ASSERT_TRUE(slow.ok()) << slow.status();
  StartServer();
  v1::AddExportResponse added;
  ASSERT_TRUE(Add("slow", (*slow)->uri(), &added).ok());
  const double before =
      ::blockmeta::testing::UpstreamCommandsSent(*server_, "slow");

  // 1. `blockmeta map slow` from 0.
  Ending cli;
  ::blockmeta::testing::RunResult cli_result;
  std::thread cli_thread([&] {
    ::blockmeta::testing::RunOptions o;
    o.timeout = absl::Seconds(60);
    cli_result = ::blockmeta::testing::RunProgram(
        {::blockmeta::testing::RunfilePath("client/blockmeta"), "map", "slow",
         "--server=unix:" + dir_.File("grpc.sock")},
        o);
    cli.at = absl::Now();
    cli.done.store(true);
  });
  // 2. A MapExtents stream from 16 MiB (its own upstream command: not
  // coalesced with the CLI's).
  Ending stream;
  grpc::Status stream_status;
  int stream_batches = 0;
  std::thread stream_thread([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(60))));
    v1::MapExtentsRequest r;
    r.set_export_name("slow");
    r.set_offset(16 << 20);
    auto reader = meta_->MapExtents(&ctx, r);
    v1::MapExtentsResponse m;
    while (reader->Read(&m)) ++stream_batches;
    stream_status = reader->Finish();
    stream.at = absl::Now();
    stream.done.store(true);
  });
  // 3. A read through the shim.
  struct nbd_handle* h = Session("slow");
  ASSERT_NE(h, nullptr);
  Ending shim;
  int shim_rc = 0;
  std::thread shim_thread([&] {
    char buf[4096];
    shim_rc = nbd_pread(h, buf, sizeof buf, 0, 0);
    shim.what = shim_rc == -1 ? nbd_get_error() : "";
    shim.at = absl::Now();
    shim.done.store(true);
  });
  // All three are waiting at the upstream now.
  ASSERT_TRUE(::blockmeta::testing::WaitUpstreamCommandsSent(*server_, "slow",
                                                             before + 2)
                  .ok());

  const absl::Time t0 = absl::Now();
  grpc::Status removed = Remove("slow");
  const absl::Duration remove_took = absl::Now() - t0;
  EXPECT_TRUE(removed.ok()) << removed.error_message();
  EXPECT_LT(remove_took, absl::Seconds(1));

  stream_thread.join();
  shim_thread.join();
  cli_thread.join();
  // Each ended at once: well before the upstream's 10 s answers.
  EXPECT_THAT(stream_status, StatusIs(grpc::StatusCode::NOT_FOUND))
      << stream_status.error_message();
  EXPECT_TRUE(absl::StrContains(stream_status.error_message(), "was removed"))
      << stream_status.error_message();
  EXPECT_EQ(stream_batches, 0);
  EXPECT_LT(stream.at - t0, absl::Seconds(3));
  EXPECT_EQ(shim_rc, -1);  // an NBD error or the closed connection
  EXPECT_LT(shim.at - t0, absl::Seconds(3));
  EXPECT_NE(cli_result.exit_code, 0) << cli_result.out;
  EXPECT_TRUE(absl::StrContains(cli_result.err, "was removed"))
      << cli_result.err;
  EXPECT_LT(cli.at - t0, absl::Seconds(3));
  // The session is closed: the next command fails at once too.
  char buf[512];
  const absl::Time t1 = absl::Now();
  EXPECT_EQ(nbd_pread(h, buf, sizeof buf, 0, 0), -1);
  EXPECT_LT(absl::Now() - t1, absl::Seconds(3));
  nbd_close(h);

  // Re-added at once: a new generation, and nothing of the old one (no
  // late answer of the old upstream reached the cache or the counters).
  v1::AddExportResponse again;
  grpc::Status readded = Add("slow", (*slow)->uri(), &again);
  ASSERT_TRUE(readded.ok()) << readded.error_message();
  EXPECT_TRUE(again.created());
  EXPECT_GT(again.export_info().generation(), added.export_info().generation());
  grpc::ClientContext ctx;
  v1::GetStatsRequest sr;
  sr.set_export_name("slow");
  v1::GetStatsResponse stats;
  ASSERT_TRUE(meta_->GetStats(&ctx, sr, &stats).ok());
  EXPECT_EQ(stats.total().upstream_calls(), 0u);
  EXPECT_EQ(stats.total().entries(), 0u);
}

// Remove and re-add an export over and over while every kind of user is in
// flight on it: long MapExtents streams (which keep read-ahead fetches in
// flight: 1 MiB windows over 64 MiB), unary GetExtents, and shim sessions
// reading and asking block status. Rounds 2, 3, 6 and 7 export it
// read-only with 4 connections, so PREFETCH_AUTO runs a whole-map prefetch
// (64 windows of 100 ms, 4 at a time) that is still in flight at the
// removal. Meant for --config=asan: a fetcher, read-ahead or prefetch run,
// stream or session that used a freed upstream or entry would be reported
// there.
TEST_F(ExportRemovalTest, RemoveAndReAddWhileEverythingIsInFlight) {
  v1::CacheConfig cache;
  cache.set_fetch_window_bytes(1 << 20);
  cache.set_read_ahead_windows(8);
  StartServer(cache);
  constexpr int kRounds = 8;
  uint64_t last_generation = 0;
  int prefetch_caught = 0;  // removals with a prefetch in flight
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const bool prefetch = (round / 2) % 2 == 1;
    v1::ExportConfig base;
    if (prefetch) {
      base.set_read_only(true);
      base.set_connections(4);  // prefetch left at PREFETCH_AUTO
    }
    // Fresh upstreams per round, one for each add: removal closes
    // connections with commands in flight, after which nbdkit 1.32's delay
    // filter may abort the server ("raw_send_socket: Assertion `sock >= 0'
    // failed" after "aborting sleep because of connection close").
    const std::vector<std::string> argv = {
        "nbdkit",
        "-U",
        "{sock}",
        "-f",
        "--filter=delay",
        "data",
        "data=( 1 @+65535 ) * 1000",
        "size=64M",
        prefetch ? "delay-extents=100ms" : "delay-extents=30ms",
        "delay-read=10ms"};
    auto up = NbdProcess::Start(argv);
    ASSERT_TRUE(up.ok()) << up.status();
    auto up2 = NbdProcess::Start(argv);
    ASSERT_TRUE(up2.ok()) << up2.status();
    v1::AddExportResponse added;
    grpc::Status a =
        Add("churn", (*up)->uri(), &added, absl::Seconds(20), base);
    ASSERT_TRUE(a.ok()) << a.error_message() << "\nnbdkit: " << (*up)->Log();
    EXPECT_GT(added.export_info().generation(), last_generation);
    last_generation = added.export_info().generation();
    const double before =
        ::blockmeta::testing::UpstreamCommandsSent(*server_, "churn");

    std::atomic<bool> stop{false};
    std::atomic<int> bad{0};  // endings other than OK / NOT_FOUND / ...
    std::vector<std::thread> users;
    users.reserve(5);  // 2 streams, 1 poller, 2 shim sessions
    for (int i = 0; i < 2; ++i) {
      users.emplace_back([&, i] {
        grpc::ClientContext ctx;
        ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(60))));
        v1::MapExtentsRequest r;
        r.set_export_name("churn");
        r.set_offset(static_cast<uint64_t>(i) << 25);
        r.set_batch_size(16);
        auto reader = meta_->MapExtents(&ctx, r);
        v1::MapExtentsResponse m;
        while (reader->Read(&m)) {
        }
        grpc::Status s = reader->Finish();
        if (!s.ok() && s.error_code() != grpc::StatusCode::NOT_FOUND &&
            s.error_code() != grpc::StatusCode::UNAVAILABLE) {
          ADD_FAILURE() << s.error_code() << " " << s.error_message();
          bad.fetch_add(1);
        }
      });
    }
    users.emplace_back([&] {
      while (!stop.load()) {
        grpc::ClientContext ctx;
        ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(30))));
        v1::GetExtentsRequest r;
        r.set_export_name("churn");
        r.set_offset(48 << 20);
        r.set_length(8 << 20);
        v1::GetExtentsResponse out;
        grpc::Status s = meta_->GetExtents(&ctx, r, &out);
        if (s.error_code() == grpc::StatusCode::NOT_FOUND) break;
        if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE) {
          ADD_FAILURE() << s.error_code() << " " << s.error_message();
          bad.fetch_add(1);
        }
      }
    });
    for (int i = 0; i < 2; ++i) {
      users.emplace_back([&, i] {
        struct nbd_handle* h = Session("churn", /*may_fail=*/true);
        if (h == nullptr) return;
        char buf[65536];
        uint64_t off = static_cast<uint64_t>(i) << 20;
        for (int n = 0; !stop.load() && n < 10000; ++n) {
          auto ignore = [](void*, const char*, uint64_t, uint32_t*, size_t,
                           int*) { return 0; };
          if (nbd_block_status(h, 4 << 20, off,
                               nbd_extent_callback{ignore, nullptr, nullptr},
                               0) == -1) {
            break;  // removed: the session was closed
          }
          if (nbd_pread(h, buf, sizeof buf, off, 0) == -1) break;
          off = (off + (4 << 20)) % (60 << 20);
        }
        nbd_close(h);
      });
    }
    // Everyone is at the upstream (streams, read-ahead, sessions).
    ASSERT_TRUE(::blockmeta::testing::WaitUpstreamCommandsSent(
                    *server_, "churn", before + 10)
                    .ok());
    if (prefetch) {
      // The prefetch has started and not finished: its fetches are at the
      // upstream when the export goes (64 windows of 100 ms on 4
      // connections take >= 1.6 s; read before the removal, so a finished
      // one is only counted, never a failure on a slow machine).
      const v1::CacheCounters c = BaseCounters("churn");
      EXPECT_GT(c.prefetch_issued(), 0u);
      if (c.prefetch_completed() == 0 && c.prefetch_inflight() > 0) {
        ++prefetch_caught;
      }
    }
    const absl::Time t0 = absl::Now();
    grpc::Status removed = Remove("churn");
    EXPECT_TRUE(removed.ok()) << removed.error_message();
    EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
    stop.store(true);
    // Odd rounds re-add before the old users are gone (AddExport waits for
    // the old generation to drain); even rounds after.
    if (round % 2 == 1) {
      v1::AddExportResponse early;
      grpc::Status e =
          Add("churn", (*up2)->uri(), &early, absl::Seconds(20), base);
      ASSERT_TRUE(e.ok()) << e.error_message() << "\nnbdkit: " << (*up2)->Log();
      ASSERT_TRUE(Remove("churn").ok());
    }
    for (std::thread& t : users) t.join();
    EXPECT_EQ(bad.load(), 0);
  }
  std::printf("%d of 4 prefetch rounds removed the export mid-prefetch\n",
              prefetch_caught);
  EXPECT_GE(prefetch_caught, 2);
}

// AddExport answers with the cause before the caller's deadline, never a
// bare DEADLINE_EXCEEDED, and remove_on_failure takes the export out.
TEST_F(ExportRemovalTest, AddExportFailsWithTheCauseBeforeTheDeadline) {
  StartServer();
  for (bool remove : {false, true}) {
    SCOPED_TRACE(remove ? "remove_on_failure" : "kept");
    const std::string name = remove ? "gone" : "kept";
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(3))));
    v1::AddExportRequest r;
    r.mutable_config()->set_name(name);
    // Nothing listens there: the upstream never connects.
    r.mutable_config()->set_nbd_uri("nbd+unix:///?socket=" +
                                    dir_.File("nobody.sock"));
    r.set_remove_on_failure(remove);
    v1::AddExportResponse out;
    const absl::Time start = absl::Now();
    grpc::Status s = admin_->AddExport(&ctx, r, &out);
    EXPECT_THAT(s, StatusIs(grpc::StatusCode::UNAVAILABLE))
        << s.error_code() << " " << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), "nobody.sock") ||
                absl::StrContains(s.error_message(), "connect"))
        << s.error_message();
    EXPECT_LT(absl::Now() - start, absl::Seconds(3));
    grpc::ClientContext lctx;
    v1::AdminListExportsResponse list;
    ASSERT_TRUE(admin_->ListExports(&lctx, {}, &list).ok());
    bool listed = false;
    for (const auto& e : list.exports()) listed |= e.config().name() == name;
    EXPECT_EQ(listed, !remove);
  }
}

}  // namespace
}  // namespace blockmeta
