// tests/service/prefetch_config_test.cc — whole-map prefetch through the
// real configuration path (issue 20 item 2): ExportConfig.prefetch and
// .connections in a ServerConfig, read by an in-process BlockMetaServer in
// front of a real nbdkit upstream (sparse-random behind the delay filter,
// every call counted by the log filter outermost), asked over gRPC.
//   - read-only + connections: 4 + PREFETCH_AUTO (the default): one small
//     GetExtents starts a background map of the whole disk; every window is
//     fetched exactly once, several calls are in flight at once, the caller
//     is answered before the map is done, GetStats shows it, and the whole
//     map then equals `nbdinfo --map` of the upstream with no more calls;
//   - PREFETCH_NONE on the same setup, and a read-write export left at
//     AUTO, fetch only the window asked for.
#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "blockmeta/v1/config.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kSize = uint64_t{64} << 30;  // 64 GiB: 17 windows
// Every extents call takes 300 ms: 17 calls, 4 at a time, take >= 1.5 s,
// while the first caller's answer needs one call.
constexpr char kSizeArg[] = "64G";
constexpr char kDelay[] = "delay-extents=300ms";
constexpr char kContent[] = "seed=11";
constexpr char kPercent[] = "percent=5";
constexpr char kRunLength[] = "runlength=1048576";

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

uint64_t HexField(const std::string& line, const std::string& key) {
  const size_t at = line.find(" " + key + "=0x");
  if (at == std::string::npos) return ~uint64_t{0};
  const size_t start = at + key.size() + 4;
  const size_t end = line.find(' ', start);
  uint64_t v = 0;
  if (!absl::SimpleHexAtoi(line.substr(start, end - start), &v)) {
    return ~uint64_t{0};
  }
  return v;
}

// The extents calls in an nbdkit log-filter log: each request's offset and
// count, the connections they came on, the most in flight at once, and
// how many had been answered.
struct Calls {
  std::vector<std::pair<uint64_t, uint64_t>> requests;  // offset, count
  std::set<std::string> connections;
  int max_inflight = 0;
  int answered = 0;
};
Calls ParseLog(const std::string& log) {
  Calls c;
  int inflight = 0;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    if (line.find(" ...Extents id=") != std::string::npos) {
      --inflight;
      ++c.answered;
    } else if (line.find(" Extents id=") != std::string::npos) {
      c.requests.emplace_back(HexField(line, "offset"),
                              HexField(line, "count"));
      const size_t at = line.find("connection=");
      if (at != std::string::npos) {
        c.connections.insert(line.substr(at, line.find(' ', at) - at));
      }
      c.max_inflight = std::max(c.max_inflight, ++inflight);
    }
  }
  return c;
}

class PrefetchConfigTest : public ::testing::Test {
 protected:
  // The delayed, logged upstream, and the same content (same seed) without
  // delay or log, for the reference map.
  void StartUpstreams() {
    log_ = dir_.File("up.log");
    auto up = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=log",
                                 "--filter=delay", "sparse-random", kSizeArg,
                                 kContent, kPercent, kRunLength, kDelay,
                                 "logfile=" + log_});
    ASSERT_TRUE(up.ok()) << up.status();
    upstream_ = *std::move(up);
    auto truth =
        NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "sparse-random",
                           kSizeArg, kContent, kPercent, kRunLength});
    ASSERT_TRUE(truth.ok()) << truth.status();
    truth_ = *std::move(truth);
  }

  // A server whose one export "disk" is configured as `e` says (name and
  // URI added here), in the ServerConfig as blockmetad reads it.
  void StartServer(v1::ExportConfig e) {
    e.set_name("disk");
    e.set_nbd_uri(upstream_->uri());
    v1::ServerConfig c;
    c.set_grpc_listen("127.0.0.1:0");
    c.set_grpc_unix_socket(dir_.File("grpc.sock"));
    *c.add_exports() = e;
    auto created = ::blockmeta::testing::StartServer(c);
    ASSERT_TRUE(created.ok()) << created.status();
    server_ = *std::move(created);
    channel_ = ::blockmeta::testing::LoopbackChannel(*server_);
    meta_ = v1::BlockMeta::NewStub(channel_);
    ASSERT_TRUE(::blockmeta::testing::WaitExportsReady(channel_, 1).ok());
  }

  // GetExtents of the first MiB (a tool asking about the first bytes).
  void AskFirstMiB() {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    v1::GetExtentsRequest r;
    r.set_export_name("disk");
    r.set_offset(0);
    r.set_length(1 << 20);
    v1::GetExtentsResponse out;
    grpc::Status s = meta_->GetExtents(&ctx, r, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_GT(out.extents_size(), 0);
  }

  v1::ExportStats Stats() {
    grpc::ClientContext ctx;
    v1::GetStatsRequest r;
    r.set_export_name("disk");
    v1::GetStatsResponse out;
    grpc::Status s = meta_->GetStats(&ctx, r, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(out.exports_size(), 1);
    return out.exports_size() == 1 ? out.exports(0) : v1::ExportStats();
  }
  v1::CacheCounters Base() {
    v1::ExportStats e = Stats();
    auto it = e.contexts().find("base:allocation");
    return it == e.contexts().end() ? v1::CacheCounters() : it->second;
  }

  Calls CallsSoFar() const { return ParseLog(ReadFile(log_)); }

  // Only the window of the first MiB is fetched, nothing after it: the
  // call is answered, and 2 s later (more than 6 more calls would take)
  // still nothing else reached the upstream.
  void ExpectOnlyTheAskedWindow() {
    ASSERT_NO_FATAL_FAILURE(AskFirstMiB());
    absl::SleepFor(absl::Seconds(2));
    const Calls calls = CallsSoFar();
    ASSERT_EQ(calls.requests.size(), 1u);
    EXPECT_EQ(calls.requests[0].first, 0u);
    EXPECT_EQ(calls.answered, 1);
    const v1::CacheCounters c = Base();
    EXPECT_EQ(c.prefetch_issued(), 0u);
    EXPECT_EQ(c.prefetch_completed(), 0u);
    EXPECT_EQ(c.upstream_calls(), 1u);
    const v1::ExportStats e = Stats();
    EXPECT_FALSE(e.prefetch_enabled());
    EXPECT_EQ(e.prefetch_parallel(), 0u);
  }

  TempDir dir_;
  std::string log_;
  std::unique_ptr<NbdProcess> upstream_;
  std::unique_ptr<NbdProcess> truth_;
  std::unique_ptr<BlockMetaServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::BlockMeta::Stub> meta_;
};

TEST_F(PrefetchConfigTest, ReadOnlyAutoPrefetchesTheWholeMapOnFourConnections) {
  ASSERT_NO_FATAL_FAILURE(StartUpstreams());
  v1::ExportConfig e;
  e.set_read_only(true);
  e.set_connections(4);  // prefetch left at its default, PREFETCH_AUTO
  ASSERT_NO_FATAL_FAILURE(StartServer(e));
  ASSERT_EQ(e.prefetch(), v1::PREFETCH_AUTO);
  EXPECT_TRUE(CallsSoFar().requests.empty());  // nothing before a caller

  const absl::Time t0 = absl::Now();
  ASSERT_NO_FATAL_FAILURE(AskFirstMiB());
  const absl::Duration first_answer = absl::Now() - t0;
  // The caller was answered while the map was still running: the
  // upstream had answered only part of the calls, and the prefetch had not
  // reached the end (17 calls of 300 ms on 4 connections need >= 1.5 s).
  const Calls at_answer = CallsSoFar();
  const v1::CacheCounters during = Base();
  EXPECT_EQ(during.prefetch_completed(), 0u);
  EXPECT_GT(during.prefetch_issued(), 0u);

  ASSERT_TRUE(Eventually([&] { return Base().prefetch_completed() == 1; },
                         absl::Seconds(60)));
  const absl::Duration whole_map = absl::Now() - t0;
  const Calls calls = CallsSoFar();
  EXPECT_LT(at_answer.answered, static_cast<int>(calls.requests.size()));

  // Every window once: the requests tile [0, size) with no repeat.
  std::vector<std::pair<uint64_t, uint64_t>> windows = calls.requests;
  std::sort(windows.begin(), windows.end());
  ASSERT_FALSE(windows.empty());
  EXPECT_EQ(windows.front().first, 0u);
  for (size_t i = 0; i + 1 < windows.size(); ++i) {
    EXPECT_EQ(windows[i].first + windows[i].second, windows[i + 1].first)
        << "window " << i;
  }
  EXPECT_EQ(windows.back().first + windows.back().second, kSize);
  // About 4 GiB each: 64 GiB in 16 or 17 calls.
  EXPECT_GE(windows.size(), 16u);
  EXPECT_LE(windows.size(), 17u);
  // Several at once, over several connections, never more than 4.
  EXPECT_GE(calls.max_inflight, 3);
  EXPECT_LE(calls.max_inflight, 4);
  EXPECT_GE(calls.connections.size(), 3u);

  const v1::ExportStats st = Stats();
  EXPECT_EQ(st.prefetch(), "PREFETCH_AUTO");
  EXPECT_TRUE(st.prefetch_enabled());
  EXPECT_EQ(st.prefetch_parallel(), 4u);
  const v1::CacheCounters c = Base();
  EXPECT_EQ(c.prefetch_completed(), 1u);
  EXPECT_EQ(c.prefetch_issued(), windows.size() - 1);  // all but the caller's
  EXPECT_EQ(c.upstream_calls(), windows.size());
  EXPECT_EQ(c.prefetch_inflight(), 0u);

  // The whole map now: the upstream's own, and no further call.
  ::blockmeta::testing::RunOptions o;
  o.timeout = absl::Seconds(60);
  ::blockmeta::testing::RunResult map = ::blockmeta::testing::RunProgram(
      {::blockmeta::testing::RunfilePath("client/blockmeta"), "map", "disk",
       "--output=nbdinfo", "--server=unix:" + dir_.File("grpc.sock")},
      o);
  ASSERT_EQ(map.exit_code, 0) << map.err;
  absl::StatusOr<std::string> truth =
      RunCommand({"nbdinfo", "--map", truth_->uri()});
  ASSERT_TRUE(truth.ok()) << truth.status();
  EXPECT_EQ(map.out, *truth);
  EXPECT_EQ(CallsSoFar().requests.size(), windows.size());
  std::printf(
      "first answer after %s, whole map (%zu calls, %d at once) after %s\n",
      absl::FormatDuration(first_answer).c_str(), windows.size(),
      calls.max_inflight, absl::FormatDuration(whole_map).c_str());
}

TEST_F(PrefetchConfigTest, PrefetchNoneFetchesOnlyWhatWasAsked) {
  ASSERT_NO_FATAL_FAILURE(StartUpstreams());
  v1::ExportConfig e;
  e.set_read_only(true);
  e.set_connections(4);
  e.set_prefetch(v1::PREFETCH_NONE);
  ASSERT_NO_FATAL_FAILURE(StartServer(e));
  ASSERT_NO_FATAL_FAILURE(ExpectOnlyTheAskedWindow());
  EXPECT_EQ(Stats().prefetch(), "PREFETCH_NONE");
}

TEST_F(PrefetchConfigTest, ReadWriteExportAtAutoDoesNotPrefetch) {
  ASSERT_NO_FATAL_FAILURE(StartUpstreams());
  v1::ExportConfig e;
  e.set_connections(4);  // read-write, prefetch at PREFETCH_AUTO
  ASSERT_NO_FATAL_FAILURE(StartServer(e));
  ASSERT_NO_FATAL_FAILURE(ExpectOnlyTheAskedWindow());
  EXPECT_EQ(Stats().prefetch(), "PREFETCH_AUTO");
}

}  // namespace
}  // namespace blockmeta
