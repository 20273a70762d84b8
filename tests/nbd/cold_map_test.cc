// tests/nbd/cold_map_test.cc — cold maps through the NBD shim against slow
// real upstreams (nbdkit sparse-random behind the delay filter, and the
// noparallel filter for a one-command-at-a-time backend such as VDDK), with
// the upstream's calls counted from nbdkit's log filter:
// * `qemu-img map` (REQ_ONE, one extent per request inside full answers)
//   gets read-ahead by position: every window fetched once, several in
//   flight at once;
// * whole-map prefetch of a read-only export spreads its calls over the
//   export's connections, each window fetched once.
// Every map is compared with `nbdinfo --map` run directly on the upstream.
#include <algorithm>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta {
namespace {

using testing::MergeAdjacent;
using testing::NbdProcess;
using testing::RunCommand;
using testing::TempDir;

constexpr char kDelay[] = "delay-extents=300ms";

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// What nbdkit's log filter says about the extents calls in `log`: how many
// were made and the most that were in flight at once.
struct Calls {
  int made = 0;
  int max_inflight = 0;
};
Calls CountCalls(const std::string& log) {
  Calls c;
  int inflight = 0;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    if (line.find(" ...Extents id=") != std::string::npos) {
      --inflight;
    } else if (line.find(" Extents id=") != std::string::npos) {
      ++c.made;
      c.max_inflight = std::max(c.max_inflight, ++inflight);
    }
  }
  return c;
}

// One sparse-random upstream (with the log filter outermost, then
// `filters`, then the delay filter) served through an in-process shim with
// the production cache defaults.
class ColdMapTest : public ::testing::Test {
 protected:
  void Start(const std::vector<std::string>& filters,
             const std::vector<std::string>& filter_args,
             const blockmeta::v1::ExportConfig& base) {
    dir_ = std::make_unique<TempDir>();
    log_ = dir_->File("up.log");
    std::vector<std::string> argv = {"nbdkit", "-f", "-U", "{sock}",
                                     "--filter=log"};
    argv.insert(argv.end(), filters.begin(), filters.end());
    argv.insert(argv.end(), {"--filter=delay", "sparse-random", "16G", "seed=1",
                             "percent=5", "runlength=1048576", kDelay,
                             absl::StrCat("logfile=", log_)});
    argv.insert(argv.end(), filter_args.begin(), filter_args.end());
    auto proc = NbdProcess::Start(argv);
    ASSERT_TRUE(proc.ok()) << proc.status();
    proc_ = *std::move(proc);
    blockmeta::v1::ExportConfig config = base;
    config.set_name("disk");
    config.set_nbd_uri(proc_->uri());
    auto up = CreateUpstream(config);
    ASSERT_TRUE(up.ok()) << up.status();
    upstream_ = *std::move(up);
    ASSERT_TRUE(upstream_->WaitReady(absl::Now() + absl::Seconds(20)))
        << upstream_->LastError();
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options());
    server_ = std::make_unique<NbdServer>(
        std::vector<nbd::ShimExport>{
            {"disk", "", upstream_, config.read_only(), absl::Seconds(30)}},
        cache_.get(), blockmeta::v1::NbdShimConfig());
    sock_ = dir_->File("shim.sock");
    ASSERT_TRUE(server_->Start("", sock_).ok());
    // The reference map, straight from the upstream; then forget its calls.
    auto direct = testing::NbdinfoMap(proc_->uri(), "base:allocation");
    ASSERT_TRUE(direct.ok()) << direct.status();
    direct_ = MergeAdjacent(*direct);
    log_before_ = ReadFile(log_).size();
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
    server_.reset();
    cache_.reset();
    upstream_.reset();
  }
  std::string ShimUri() const {
    return absl::StrCat("nbd+unix:///disk?socket=", sock_);
  }
  // The extents calls made since Start() finished.
  Calls CallsSinceStart() const {
    return CountCalls(ReadFile(log_).substr(log_before_));
  }
  // `qemu-img map` through the shim, as data/hole extents.
  absl::StatusOr<ExtentList> QemuImgMap() const {
    auto out = RunCommand({"qemu-img", "map", "--output=json", ShimUri()});
    if (!out.ok()) return out.status();
    auto parsed = testing::ParseQemuImgMapJson(*out);
    if (!parsed.ok()) return parsed.status();
    return MergeAdjacent(*parsed);
  }

  std::unique_ptr<TempDir> dir_;
  std::string log_;
  size_t log_before_ = 0;
  std::unique_ptr<NbdProcess> proc_;
  std::shared_ptr<Upstream> upstream_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<NbdServer> server_;
  std::string sock_;
  ExtentList direct_;
};

// 16 GiB in windows of 4 GiB - 1 MiB: 5 upstream calls.
constexpr int kWindows = 5;

TEST_F(ColdMapTest, QemuImgMapGetsReadAheadByPosition) {
  ASSERT_NO_FATAL_FAILURE(Start({}, {}, {}));
  auto map = QemuImgMap();
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(*map, direct_);
  const Calls calls = CallsSinceStart();
  EXPECT_EQ(calls.made, kWindows);  // every window once
  // Without read-ahead qemu-img map has one call in flight at a time; with
  // it the first miss already sends every window (5 <= 1 + 8).
  EXPECT_GE(calls.max_inflight, 3);
  const CacheCounters c = cache_->Counters();
  EXPECT_GE(c.read_ahead_walks, 1u);
  EXPECT_EQ(c.read_ahead_issued, uint64_t{kWindows - 1});
  EXPECT_EQ(c.upstream_calls, uint64_t{kWindows});
  // A second map is served from the cache alone.
  auto again = QemuImgMap();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, direct_);
  EXPECT_EQ(CallsSinceStart().made, kWindows);
}

// A one-command-at-a-time upstream (noparallel serialize=requests), served
// read-only with 4 connections: the first block-status call starts the
// whole-map prefetch, which keeps 4 calls in flight, one per connection.
TEST_F(ColdMapTest, WholeMapPrefetchUsesEveryConnection) {
  blockmeta::v1::ExportConfig config;
  config.set_read_only(true);
  config.set_connections(4);
  ASSERT_NO_FATAL_FAILURE(
      Start({"--filter=noparallel"}, {"serialize=requests"}, config));
  cache_->SetExportPrefetch("disk", 4);  // what PREFETCH_AUTO sets here
  auto map = testing::NbdinfoMap(ShimUri(), "base:allocation");
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(MergeAdjacent(*map), direct_);
  ASSERT_TRUE(testing::Eventually(
      [&] { return cache_->Counters().prefetch_completed == 1; }));
  const Calls calls = CallsSinceStart();
  EXPECT_EQ(calls.made, kWindows);  // every window once
  // More than one call at once through a one-at-a-time upstream: the
  // prefetch spread them over the connections.
  EXPECT_GE(calls.max_inflight, 2);
  EXPECT_LE(calls.max_inflight, 4);
  const CacheCounters c = cache_->Counters();
  EXPECT_EQ(c.prefetch_issued, uint64_t{kWindows - 1});
  EXPECT_EQ(c.upstream_calls, uint64_t{kWindows});
}

}  // namespace
}  // namespace blockmeta
