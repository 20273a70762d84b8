// server/upstream/nbd_upstream_test.cc — NbdUpstream against real nbdkit
// and qemu-nbd: negotiated info and contexts, extents equal to what
// `nbdinfo --map` reports for the same export, the pool, data commands.
#include "server/upstream/nbd_upstream.h"

#include <signal.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_upstream_test_util.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::UnorderedElementsAre;

constexpr uint64_t kMiB = 1 << 20;

// The whole map of `context`, by repeated BlockStatus calls; checks every
// reply starts where asked and is contiguous.
ExtentList FullMap(Upstream& up, const std::string& context, uint64_t size,
                   uint64_t window = kMaxNbdRequestLength) {
  ExtentList all;
  uint64_t offset = 0;
  while (offset < size) {
    absl::StatusOr<ExtentList> r =
        up.BlockStatus(context, offset, window, Soon());
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok() || r->empty()) break;
    EXPECT_EQ(r->front().offset, offset);
    for (const Extent& e : *r) {
      EXPECT_EQ(e.offset, offset);
      EXPECT_GT(e.length, 0u);
      offset = e.end();
      all.push_back(e);
    }
  }
  EXPECT_EQ(offset, size);
  return MergeAdjacent(all);
}

ExtentList ToolMap(const std::string& uri, const std::string& context) {
  absl::StatusOr<ExtentList> m = NbdinfoMap(uri, context);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? MergeAdjacent(*m) : ExtentList{};
}

TEST(NbdUpstreamTest, NbdkitMemoryInfoAndMapMatchNbdinfo) {
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "64M"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  absl::StatusOr<testing::NbdinfoExport> tool =
      testing::Nbdinfo((*server)->uri());
  ASSERT_TRUE(tool.ok()) << tool.status();
  EXPECT_EQ(info->size, tool->size);
  EXPECT_EQ(info->size, 64 * kMiB);
  EXPECT_THAT(info->contexts, ElementsAre("base:allocation"));
  EXPECT_EQ(info->contexts, tool->contexts);
  EXPECT_FALSE(info->read_only);
  EXPECT_TRUE(info->can_trim);
  EXPECT_TRUE(info->can_zero);
  EXPECT_TRUE(info->can_flush);
  EXPECT_TRUE(info->can_multi_conn);
  // The pool fills right after the first connection.
  EXPECT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  EXPECT_EQ(up->Generation(), 1u);
  EXPECT_EQ(up->LastError(), "");
  // A fresh export has not reconnected.
  EXPECT_EQ(up->Stats().reconnects, 0u);
  EXPECT_EQ(up->Stats().connections.size(), 2u);

  EXPECT_THAT(FullMap(*up, "base:allocation", info->size),
              ElementsAre(Extent{0, 64 * kMiB, kStateHole | kStateZero}));

  // Write data and zeroes through the upstream; the maps still agree.
  std::string data(128 << 10, 'x');
  ASSERT_TRUE(up->Pwrite(data.data(), data.size(), 8 * kMiB, 0, Soon()).ok());
  ASSERT_TRUE(
      up->Pwrite(data.data(), data.size(), 40 * kMiB, kCmdFlagFua, Soon())
          .ok());
  ASSERT_TRUE(up->Flush(Soon()).ok());
  ExtentList ours = FullMap(*up, "base:allocation", info->size);
  EXPECT_EQ(ours, ToolMap((*server)->uri(), "base:allocation"));
  EXPECT_GE(ours.size(), 5u);

  std::string back(data.size(), '\0');
  ASSERT_TRUE(up->Pread(back.data(), back.size(), 8 * kMiB, Soon()).ok());
  EXPECT_EQ(back, data);
  ASSERT_TRUE(up->Trim(data.size(), 8 * kMiB, 0, Soon()).ok());
  ASSERT_TRUE(up->Zero(data.size(), 40 * kMiB, kCmdFlagNoHole, Soon()).ok());
  ASSERT_TRUE(up->Cache(kMiB, 0, Soon()).ok());
  EXPECT_EQ(FullMap(*up, "base:allocation", info->size),
            ToolMap((*server)->uri(), "base:allocation"));
}

TEST(NbdUpstreamTest, NbdkitDataPluginViaCommand) {
  const std::vector<std::string> plugin = {"data", "1 @1048576 2 @4194303 3"};
  std::vector<std::string> argv = {"nbdkit", "-U", "{sock}", "-f"};
  argv.insert(argv.end(), plugin.begin(), plugin.end());
  auto server = NbdProcess::Start(argv);
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<std::string> cmd = {"nbdkit"};
  cmd.insert(cmd.end(), plugin.begin(), plugin.end());
  auto up = Connect(CommandExport(cmd));
  ASSERT_NE(up, nullptr);
  EXPECT_GT(SpawnedServerPidForTesting(up.get()), 0);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 4194304u);
  EXPECT_TRUE(absl::StrContains(info->description, "nbdkit data"));
  ExtentList tool = ToolMap((*server)->uri(), "base:allocation");
  EXPECT_EQ(FullMap(*up, "base:allocation", info->size), tool);
  // Small windows (replies of many calls) give the same map.
  EXPECT_EQ(FullMap(*up, "base:allocation", info->size, 100000), tool);
  char buf[2];
  ASSERT_TRUE(up->Pread(buf, 1, 1048576, Soon()).ok());
  EXPECT_EQ(buf[0], 2);
}

TEST(NbdUpstreamTest, NbdkitSparseRandomMapMatchesNbdinfo) {
  auto server = NbdProcess::Start(
      {"nbdkit", "-U", "{sock}", "-f", "sparse-random", "1G", "seed=4242"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  ExtentList tool = ToolMap((*server)->uri(), "base:allocation");
  ExtentList ours = FullMap(*up, "base:allocation", info->size);
  EXPECT_GT(ours.size(), 2u);
  EXPECT_EQ(ours, tool);
}

TEST(NbdUpstreamTest, NbdkitFilePluginRepliesPastTheRequest) {
  TempDir dir;
  const std::string img = dir.File("disk.raw");
  ASSERT_TRUE(MakeImage(img, "raw", 16 * kMiB,
                        {"write -P 0x11 0 64k", "write -P 0x22 8M 1M"})
                  .ok());
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "file", img});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  // Ask for 4 KiB of the hole: nbdkit's file plugin answers to the end of
  // the hole, beyond what was asked; we keep it.
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 1 * kMiB, 4096, Soon());
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(r->empty());
  EXPECT_EQ(r->front().offset, kMiB);
  EXPECT_EQ(r->front().flags, kStateHole | kStateZero);
  EXPECT_GT(r->back().end(), kMiB + 4096);
  EXPECT_EQ(FullMap(*up, "base:allocation", 16 * kMiB),
            ToolMap((*server)->uri(), "base:allocation"));
}

TEST(NbdUpstreamTest, BeyondFourGiBIsCappedPerRequest) {
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "10G"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  const uint64_t size = uint64_t{10} << 30;
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, size, Soon());
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(r->empty());
  EXPECT_LE(r->front().end(), kMaxNbdRequestLength);
  EXPECT_LT(r->back().end(), size);
  EXPECT_EQ(FullMap(*up, "base:allocation", size),
            ToolMap((*server)->uri(), "base:allocation"));
  // The tail is clipped to the size.
  r = up->BlockStatus("base:allocation", size - 4096, kMaxNbdRequestLength,
                      Soon());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre(Extent{size - 4096, 4096, 3}));
}

TEST(NbdUpstreamTest, RangeAndContextErrors) {
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "1M"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("qemu:dirty-bitmap:b1", 0, 4096, Soon());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(absl::StrContains(r.status().message(),
                                "does not offer context qemu:dirty-bitmap:b1; "
                                "offered: base:allocation"))
      << r.status();
  EXPECT_THAT(up->BlockStatus("base:allocation", kMiB, 1, Soon()),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(up->BlockStatus("base:allocation", 0, 0, Soon()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  char buf[4096];
  EXPECT_THAT(up->Pread(buf, 4096, kMiB - 100, Soon()),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(up->Pwrite(buf, 4096, kMiB, 0, Soon()),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(up->Zero(1, kMiB, 0, Soon()),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(up->Trim(kMiB + 1, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kOutOfRange));
}

TEST(NbdUpstreamTest, ReadOnlyRefusesWrites) {
  auto server = NbdProcess::Start(
      {"nbdkit", "-U", "{sock}", "-f", "--readonly", "memory", "1M"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(up->Info().ok());
  EXPECT_TRUE(up->Info()->read_only);
  char buf[512] = {};
  EXPECT_THAT(up->Pwrite(buf, sizeof buf, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(up->Zero(512, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(up->Trim(512, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_TRUE(up->Pread(buf, sizeof buf, 0, Soon()).ok());

  // The config can force read-only on a writable upstream too.
  auto rw = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "1M"});
  ASSERT_TRUE(rw.ok()) << rw.status();
  auto config = UriExport((*rw)->uri());
  config.set_read_only(true);
  auto up2 = Connect(config);
  ASSERT_NE(up2, nullptr);
  EXPECT_THAT(up2->Pwrite(buf, sizeof buf, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
}

TEST(NbdUpstreamTest, PoolRespectsMultiConn) {
  auto config = CommandExport({"nbdkit", "--filter=multi-conn", "memory", "1M",
                               "multi-conn-mode=disable"});
  config.set_connections(4);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(up->Info().ok());
  EXPECT_FALSE(up->Info()->can_multi_conn);
  EXPECT_EQ(LiveConnectionsForTesting(up.get()), 1);

  auto config4 = CommandExport({"nbdkit", "memory", "1M"});
  config4.set_connections(4);
  auto up4 = Connect(config4);
  ASSERT_NE(up4, nullptr);
  // The pool fills in the background.
  Eventually([&] { return LiveConnectionsForTesting(up4.get()) >= 4; },
             absl::Seconds(2));
  EXPECT_EQ(LiveConnectionsForTesting(up4.get()), 4);
}

TEST(NbdUpstreamTest, ConcurrentCallsShareThePool) {
  // nbdkit's log filter records which connection served each extents call:
  // concurrent callers must be spread over both pool connections (a
  // structural check, not a timing one).
  TempDir dir;
  const std::string log = dir.File("nbdkit.log");
  auto up = Connect(
      CommandExport({"nbdkit", "--filter=log", "--filter=delay", "memory",
                     "64M", "logfile=" + log, "delay-extents=50ms"}));
  ASSERT_NE(up, nullptr);
  Eventually([&] { return LiveConnectionsForTesting(up.get()) >= 2; },
             absl::Seconds(5));
  ASSERT_EQ(LiveConnectionsForTesting(up.get()), 2);
  std::atomic<int> ok{0};
  constexpr int kThreads = 8;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        auto r = up->BlockStatus("base:allocation", t * kMiB, kMiB, Soon());
        if (r.ok() && !r->empty() && r->front().offset == t * kMiB) ++ok;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), kThreads * 5);
  auto text = ::blockmeta::testing::RunCommand({"cat", log});
  ASSERT_TRUE(text.ok()) << text.status();
  int on_conn1 = 0, on_conn2 = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (!absl::StrContains(line, " Extents id=")) continue;
    if (absl::StrContains(line, "connection=1 ")) ++on_conn1;
    if (absl::StrContains(line, "connection=2 ")) ++on_conn2;
  }
  EXPECT_EQ(on_conn1 + on_conn2, 40) << *text;
  EXPECT_GT(on_conn1, 0);
  EXPECT_GT(on_conn2, 0);
}

// nbds:// — an upstream that requires TLS (nbdkit --tls=require with
// certificates made by openssl). libnbd does the TLS; the URI carries the
// certificate directory.
// The most Read requests nbdkit's log filter shows in flight at once.
int MaxReadsInFlight(const std::string& log) {
  int now = 0, most = 0;
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (absl::StrContains(line, "...Read id=")) {
      --now;
    } else if (absl::StrContains(line, " Read id=")) {
      most = std::max(most, ++now);
    }
  }
  return most;
}

TEST(NbdUpstreamTest, ConcurrentCommandsOverlapOnOneHandle) {
  TempDir dir;
  const std::string log = dir.File("nbdkit.log");
  auto config =
      CommandExport({"nbdkit", "--filter=log", "--filter=delay", "memory",
                     "64M", "logfile=" + log, "delay-read=200ms"});
  config.set_connections(1);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  constexpr int kReads = 8;
  std::vector<std::vector<char>> bufs(kReads, std::vector<char>(4096));
  // Reference: one read alone, in this run.
  absl::Time start = absl::Now();
  ASSERT_TRUE(up->Pread(bufs[0].data(), 4096, 0, Soon()).ok());
  const absl::Duration one = absl::Now() - start;
  EXPECT_GE(one, absl::Milliseconds(190));

  std::atomic<int> done{0};
  start = absl::Now();
  for (int i = 0; i < kReads; ++i) {
    up->AsyncPread(bufs[i].data(), 4096, i * kMiB, [&](const absl::Status& s) {
      EXPECT_TRUE(s.ok()) << s;
      ++done;
    });
  }
  ASSERT_TRUE(Eventually([&] { return done.load() == kReads; }));
  const absl::Duration all = absl::Now() - start;
  // Serialised they would take kReads x one; overlapped about one.
  EXPECT_LT(all, one * kReads / 2) << "one " << one << ", all " << all;
  const UpstreamStats stats = up->Stats();
  ASSERT_EQ(stats.connections.size(), 1u);
  EXPECT_GE(stats.connections[0].max_in_flight, static_cast<uint64_t>(kReads));
  EXPECT_EQ(stats.commands_in_flight, 0u);
  EXPECT_EQ(stats.commands_issued, kReads + 1u);
  // The server saw them in flight together.
  auto text = RunCommand({"cat", log});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_GE(MaxReadsInFlight(*text), kReads) << *text;
}

int ThreadsOfThisProcess() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    (void)e;
    ++n;
  }
  return n;
}

TEST(NbdUpstreamTest, ManyUpstreamsShareTheEngineThreads) {
  const int before = ThreadsOfThisProcess();
  std::vector<std::unique_ptr<Upstream>> ups;
  for (int i = 0; i < 8; ++i) {
    ups.push_back(Connect(CommandExport({"nbdkit", "memory", "1M"})));
    ASSERT_NE(ups.back(), nullptr);
  }
  for (auto& up : ups) {
    EXPECT_TRUE(
        Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
    EXPECT_TRUE(up->BlockStatus("base:allocation", 0, kMiB, Soon()).ok());
  }
  // Two drivers and a timer for the whole process (started by the first
  // upstream ever made), not a thread per upstream or per handle.
  EXPECT_EQ(UpstreamEngineThreads(), 3);
  EXPECT_LE(ThreadsOfThisProcess() - before, UpstreamEngineThreads());
}

TEST(NbdUpstreamTest, TlsUpstreamThroughNbdsUri) {
  TempDir dir;
  const std::string& d = dir.path();
  auto run = [](const std::vector<std::string>& argv) {
    auto r = RunCommand(argv);
    ASSERT_TRUE(r.ok()) << r.status();
  };
  run({"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=blockmeta-test-ca", "-keyout", d + "/ca-key.pem", "-out",
       d + "/ca-cert.pem"});
  run({"openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj",
       "/CN=localhost", "-keyout", d + "/server-key.pem", "-out",
       d + "/server.csr"});
  run({"openssl", "x509", "-req", "-in", d + "/server.csr", "-CA",
       d + "/ca-cert.pem", "-CAkey", d + "/ca-key.pem", "-CAcreateserial",
       "-days", "2", "-out", d + "/server-cert.pem"});
  auto server = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f",
                                   "--tls=require", "--tls-certificates=" + d,
                                   "data", "data=@65536 1", "size=1M"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string sock = (*server)->socket_path();

  auto up = Connect(UriExport(
      absl::StrCat("nbds+unix:///?socket=", sock, "&tls-certificates=", d)));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 1u << 20);
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, 1 << 20, Soon());
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(r->empty());
  EXPECT_EQ(r->front().offset, 0u);

  // Without TLS the server refuses; the export stays unavailable and says
  // why instead of pretending.
  auto plain = CreateUpstream(UriExport("nbd+unix:///?socket=" + sock));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE((*plain)->WaitReady(absl::Now() + absl::Seconds(2)));
  EXPECT_FALSE((*plain)->Ready());
  EXPECT_THAT((*plain)->Info(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_NE((*plain)->LastError(), "");
}

class QemuNbdTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(QemuNbdTest, RawImage) {
  const std::string img = dir_.File("disk.img");
  ASSERT_TRUE(MakeImage(img, "raw", 8 * kMiB,
                        {"write -P 0xab 1M 64k", "write -P 0xcd 4M 1M"})
                  .ok());
  auto up = Connect(ImageExport(img, /*read_only=*/true));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 8 * kMiB);
  EXPECT_TRUE(info->read_only);
  EXPECT_THAT(info->contexts, ElementsAre("base:allocation"));
  auto tool = NbdProcess::Start(
      {"qemu-nbd", "-t", "-k", "{sock}", "-f", "raw", "--read-only", img});
  ASSERT_TRUE(tool.ok()) << tool.status();
  EXPECT_EQ(FullMap(*up, "base:allocation", info->size),
            ToolMap((*tool)->uri(), "base:allocation"));
}

TEST_F(QemuNbdTest, Qcow2WithDirtyBitmap) {
  const std::string img = dir_.File("disk.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 16 * kMiB, {"write -P 1 0 1M"}).ok());
  ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "b1"}).ok());
  ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "b2"}).ok());
  ASSERT_TRUE(
      QemuIo(img, "qcow2", {"write -P 2 2M 64k", "write -z 6M 128k"}).ok());
  // The format comes from the ".qcow2" suffix.
  auto up = Connect(ImageExport(img, /*read_only=*/true, {"b1", "b2"}));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 16 * kMiB);
  EXPECT_THAT(info->contexts,
              UnorderedElementsAre("base:allocation", "qemu:dirty-bitmap:b1",
                                   "qemu:dirty-bitmap:b2"));
  auto tool = NbdProcess::Start({"qemu-nbd", "-t", "-k", "{sock}", "-f",
                                 "qcow2", "--read-only", "-B", "b1", img});
  ASSERT_TRUE(tool.ok()) << tool.status();
  EXPECT_EQ(FullMap(*up, "base:allocation", info->size),
            ToolMap((*tool)->uri(), "base:allocation"));
  ExtentList dirty = FullMap(*up, "qemu:dirty-bitmap:b1", info->size);
  EXPECT_EQ(dirty, ToolMap((*tool)->uri(), "qemu:dirty-bitmap:b1"));
  // 2M+64k and 6M+128k were written after the bitmap was added.
  uint64_t dirty_bytes = 0;
  for (const Extent& e : dirty) {
    if (e.flags & kStateDirty) dirty_bytes += e.length;
  }
  EXPECT_GE(dirty_bytes, 192u << 10);
  EXPECT_LT(dirty_bytes, 2 * kMiB);
  EXPECT_THAT(up->BlockStatus("qemu:dirty-bitmap:b3", 0, 4096, Soon()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(QemuNbdTest, WritableQcow2ImageRoundTrip) {
  const std::string img = dir_.File("rw.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 4 * kMiB).ok());
  auto config = ImageExport(img, /*read_only=*/false);
  config.set_connections(3);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(up->Info().ok());
  EXPECT_FALSE(up->Info()->read_only);
  std::string data(64 << 10, 'q');
  ASSERT_TRUE(
      up->Pwrite(data.data(), data.size(), kMiB, kCmdFlagFua, Soon()).ok());
  ASSERT_TRUE(up->Flush(Soon()).ok());
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", kMiB, 64 << 10, Soon());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, ElementsAre(Extent{kMiB, 64 << 10, 0}));
  std::string back(data.size(), '\0');
  ASSERT_TRUE(up->Pread(back.data(), back.size(), kMiB, Soon()).ok());
  EXPECT_EQ(back, data);
  const pid_t pid = SpawnedServerPidForTesting(up.get());
  ASSERT_GT(pid, 0);
  up.reset();  // stops qemu-nbd (SIGTERM) and reaps it
  EXPECT_NE(kill(pid, 0), 0);
  // The write reached the image.
  absl::StatusOr<ExtentList> local = testing::QemuImgMap(img, "qcow2");
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_THAT(testing::Slice(*local, kMiB, 64 << 10),
              ElementsAre(Extent{kMiB, 64 << 10, 0}));
}

}  // namespace
}  // namespace blockmeta
