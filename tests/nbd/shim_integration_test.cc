// tests/nbd/shim_integration_test.cc — the NBD shim end to end: real
// upstreams (qemu-nbd / nbdkit, through the libnbd Upstream) and real
// clients (qemu-img, nbdinfo, nbdcopy, qemu-io) through the shim, compared
// with the same tools run directly against the upstream.
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_errors.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_request.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta {
namespace {

using testing::MergeAdjacent;
using testing::NbdinfoMap;
using testing::NbdProcess;
using testing::RunCommand;
using testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;

struct Image {
  std::string name;    // export name
  std::string format;  // raw / qcow2
  std::vector<std::string> qemu_io;
  bool bitmap = false;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class ShimIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<TempDir>();
    const std::vector<Image> images = {
        {"empty", "raw", {}},
        {"full", "raw", {"write -P 0xab 0 16M"}},
        {"fragmented",
         "raw",
         {"write -P 1 0 64k", "write -P 2 1M 192k", "write -z 3M 64k",
          "write -P 3 5M 4k", "write -P 4 9M 1M", "write -P 5 15M 1M"}},
        {"dirty", "qcow2", {"write -P 7 0 1M"}, /*bitmap=*/true},
        {"plainq", "qcow2", {"write -P 6 2M 1M", "write -z 6M 64k"}},
    };
    std::vector<nbd::ShimExport> exports;
    for (const Image& img : images) {
      const std::string path = dir_->File(img.name + "." + img.format);
      ASSERT_TRUE(
          testing::MakeImage(path, img.format, 16 * kMiB, img.qemu_io).ok());
      std::vector<std::string> argv = {
          "qemu-nbd", "-f",           img.format,   "-k",
          "{sock}",   "--persistent", "--shared=0", "--cache=none"};
      if (img.bitmap) {
        // Add the bitmap, then dirty part of the image.
        ASSERT_TRUE(
            RunCommand({"qemu-img", "bitmap", "--add", path, "b1"}).ok());
        ASSERT_TRUE(
            testing::QemuIo(path, "qcow2",
                            {"write -P 8 4M 512k", "write -P 9 12M 64k"})
                .ok());
        argv.insert(argv.end(), {"-B", "b1"});
      }
      argv.push_back(path);
      auto proc = NbdProcess::Start(argv);
      ASSERT_TRUE(proc.ok()) << proc.status();
      blockmeta::v1::ExportConfig config;
      config.set_name(img.name);
      config.set_nbd_uri((*proc)->uri());
      auto up = CreateUpstream(config);
      ASSERT_TRUE(up.ok()) << up.status();
      testing::Eventually([&] { return (*up)->Ready(); }, absl::Seconds(20),
                          absl::Milliseconds(20));
      ASSERT_TRUE((*up)->Ready()) << (*up)->LastError();
      std::shared_ptr<Upstream> shared = *std::move(up);
      exports.push_back({img.name, "", shared, false, absl::Seconds(30)});
      direct_[img.name] = (*proc)->uri();
      procs_.push_back(std::move(*proc));
      upstreams_.push_back(std::move(shared));
    }
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options());
    server_ = std::make_unique<NbdServer>(std::move(exports), cache_.get(),
                                          blockmeta::v1::NbdShimConfig());
    sock_ = dir_->File("shim.sock");
    ASSERT_TRUE(server_->Start("", sock_).ok());
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::string ShimUri(const std::string& name) const {
    return absl::StrCat("nbd+unix:///", name, "?socket=", sock_);
  }
  // `qemu-img map --output=json` merged.
  static absl::StatusOr<ExtentList> QemuImgMap(const std::string& uri) {
    auto out = RunCommand({"qemu-img", "map", "--output=json", uri});
    if (!out.ok()) return out.status();
    auto parsed = testing::ParseQemuImgMapJson(*out);
    if (!parsed.ok()) return parsed.status();
    return MergeAdjacent(*parsed);
  }
  static absl::StatusOr<ExtentList> Nbdinfo(
      const std::string& uri, const std::string& context = "base:allocation") {
    auto m = NbdinfoMap(uri, context);
    if (!m.ok()) return m.status();
    return MergeAdjacent(*m);
  }

  std::unique_ptr<TempDir> dir_;
  std::vector<std::unique_ptr<NbdProcess>> procs_;
  std::vector<std::shared_ptr<Upstream>> upstreams_;
  std::map<std::string, std::string> direct_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<NbdServer> server_;
  std::string sock_;
};

TEST_F(ShimIntegrationTest, QemuImgMapMatchesTheUpstream) {
  for (const auto& [name, uri] : direct_) {
    auto want = QemuImgMap(uri);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = QemuImgMap(ShimUri(name));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, *want) << name;
    // Again, from the cache.
    got = QemuImgMap(ShimUri(name));
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(*got, *want) << name;
  }
}

TEST_F(ShimIntegrationTest, NbdinfoMapMatchesTheUpstream) {
  for (const auto& [name, uri] : direct_) {
    auto want = Nbdinfo(uri);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = Nbdinfo(ShimUri(name));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, *want) << name;
  }
  auto want = Nbdinfo(direct_["dirty"], "qemu:dirty-bitmap:b1");
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_GE(want->size(), 3u);  // clean / dirty / clean ...
  auto got = Nbdinfo(ShimUri("dirty"), "qemu:dirty-bitmap:b1");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *want);
}

TEST_F(ShimIntegrationTest, NbdinfoDescribesTheExport) {
  auto info = testing::Nbdinfo(ShimUri("dirty"));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 16 * kMiB);
  EXPECT_FALSE(info->read_only);
  EXPECT_EQ(info->contexts, (std::vector<std::string>{"base:allocation",
                                                      "qemu:dirty-bitmap:b1"}));
  EXPECT_GE(info->maximum_block_size, info->preferred_block_size);
}

TEST_F(ShimIntegrationTest, NbdcopyGivesTheSameBytes) {
  for (const std::string name : {"fragmented", "dirty"}) {
    const std::string a = dir_->File(name + "-shim.raw");
    const std::string b = dir_->File(name + "-direct.raw");
    ASSERT_TRUE(RunCommand({"nbdcopy", ShimUri(name), a}).ok());
    ASSERT_TRUE(RunCommand({"nbdcopy", direct_[name], b}).ok());
    const std::string da = ReadFile(a), db = ReadFile(b);
    EXPECT_EQ(da.size(), 16 * kMiB);
    EXPECT_TRUE(da == db) << name;
  }
}

TEST_F(ShimIntegrationTest, WritesThroughTheShimAreSeenByTheNextMap) {
  auto before = QemuImgMap(ShimUri("empty"));  // fills the cache
  ASSERT_TRUE(before.ok());
  ASSERT_EQ(*before, *QemuImgMap(direct_["empty"]));
  ASSERT_TRUE(RunCommand({"qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64k",
                          "-c", "write -z 8M 1M", ShimUri("empty")})
                  .ok());
  auto want = QemuImgMap(direct_["empty"]);
  ASSERT_TRUE(want.ok());
  auto got = QemuImgMap(ShimUri("empty"));
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, *want);
  EXPECT_NE(*got, *before);  // the write is visible: no stale hole
  auto got_info = Nbdinfo(ShimUri("empty"));
  ASSERT_TRUE(got_info.ok());
  EXPECT_EQ(*got_info, *Nbdinfo(direct_["empty"]));
  // And the bitmap of the qcow2 export sees a write through the shim.
  Nbdinfo(ShimUri("dirty"), "qemu:dirty-bitmap:b1").IgnoreError();
  ASSERT_TRUE(RunCommand({"qemu-io", "-f", "raw", "-c", "write -P 1 14M 64k",
                          ShimUri("dirty")})
                  .ok());
  auto bm = Nbdinfo(ShimUri("dirty"), "qemu:dirty-bitmap:b1");
  ASSERT_TRUE(bm.ok());
  EXPECT_EQ(*bm, *Nbdinfo(direct_["dirty"], "qemu:dirty-bitmap:b1"));
}

// Sends `rounds` random sub-4 KiB WRITE / TRIM / WRITE_ZEROES to export
// `name` through the shim at `shim_sock`; before each the shim's cache is
// warmed, after each the shim's map of every context must equal the
// upstream's (`direct_uri`), extent for extent.
void ExpectExactAfterRandomSmallWrites(const std::string& shim_sock,
                                       const std::string& name,
                                       const std::string& direct_uri,
                                       const std::vector<std::string>& contexts,
                                       uint64_t size, int rounds,
                                       std::mt19937* rng) {
  const std::string shim_uri =
      absl::StrCat("nbd+unix:///", name, "?socket=", shim_sock);
  auto map = [](const std::string& uri, const std::string& ctx) {
    absl::StatusOr<ExtentList> m = NbdinfoMap(uri, ctx);
    if (!m.ok()) return m;
    return absl::StatusOr<ExtentList>(MergeAdjacent(*m));
  };
  auto c = nbd::testing::RawClient::ConnectUnix(shim_sock);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE((*c)->Handshake(name, true, contexts).ok());
  for (int i = 0; i < rounds; ++i) {
    for (const std::string& ctx : contexts) {  // warm the cache
      ASSERT_TRUE(map(shim_uri, ctx).ok());
    }
    nbd::Request r;
    const uint16_t types[] = {nbd::kCmdWrite, nbd::kCmdTrim,
                              nbd::kCmdWriteZeroes};
    r.type = types[(*rng)() % 3];
    r.offset = ((*rng)() % (size / 512)) * 512;
    r.length = static_cast<uint32_t>(512 * (1 + (*rng)() % 7));  // < 4 KiB
    if (r.offset + r.length > size) r.offset = size - r.length;
    r.handle = i;
    const std::string payload =
        r.type == nbd::kCmdWrite ? std::string(r.length, '\x5a') : "";
    auto reply = (*c)->Call(r, payload);
    ASSERT_TRUE(reply.ok()) << reply.status();
    ASSERT_EQ(reply->error, 0u) << nbd::CommandName(r.type);
    for (const std::string& ctx : contexts) {
      auto want = map(direct_uri, ctx);
      ASSERT_TRUE(want.ok()) << want.status();
      auto got = map(shim_uri, ctx);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(*got, *want)
          << name << " " << ctx << " after " << nbd::CommandName(r.type) << " "
          << r.offset << "+" << r.length;
    }
  }
}

// Sub-4 KiB writes, trims and zeroes change the upstream's answers around
// them (filesystem blocks, qcow2 clusters, 64 KiB bitmap granules). After
// each one, through a warm cache, the shim's map of every context equals
// the upstream's own, extent for extent.
TEST_F(ShimIntegrationTest, ExactAfterRandomSmallWrites) {
  std::mt19937 rng(20211);
  struct Target {
    std::string name;
    std::vector<std::string> contexts;
  };
  for (const Target& t : std::vector<Target>{
           {"fragmented", {"base:allocation"}},
           {"plainq", {"base:allocation"}},
           {"dirty", {"base:allocation", "qemu:dirty-bitmap:b1"}}}) {
    ExpectExactAfterRandomSmallWrites(sock_, t.name, direct_[t.name],
                                      t.contexts, 16 * kMiB, 12, &rng);
    if (HasFatalFailure()) return;
  }
}

// Images blockmeta serves itself (ExportConfig.image): the shim learns the
// qcow2 cluster size and every bitmap's granularity (qemu-img info), so it
// stays exact where the 2 MiB default would not be: 2 MiB clusters with a
// 4 MiB bitmap, and 64 KiB clusters with a 4 MiB bitmap (finer than the
// default for allocation, coarser for the bitmap).
TEST(ShimLearnedGranularity, ExactAfterRandomSmallWritesOnCoarseImages) {
  TempDir dir;
  struct Coarse {
    std::string name;
    std::string cluster;
  };
  const std::vector<Coarse> images = {{"c2m", "2M"}, {"c64k", "64k"}};
  std::vector<std::shared_ptr<Upstream>> upstreams;
  std::vector<nbd::ShimExport> exports;
  std::map<std::string, std::string> direct;
  for (const Coarse& img : images) {
    const std::string path = dir.File(img.name + ".qcow2");
    ASSERT_TRUE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            "cluster_size=" + img.cluster, path, "32M"})
                    .ok());
    ASSERT_TRUE(
        RunCommand({"qemu-img", "bitmap", "--add", "-g", "4194304", path, "b4"})
            .ok());
    ASSERT_TRUE(testing::QemuIo(path, "qcow2",
                                {"write -P 1 0 1M", "write -P 2 9M 64k",
                                 "write -z 17M 3M", "write -P 3 30M 512"})
                    .ok());
    blockmeta::v1::ExportConfig config;
    config.set_name(img.name);
    config.mutable_image()->set_path(path);
    config.mutable_image()->add_bitmaps("b4");
    auto up = CreateUpstream(config);
    ASSERT_TRUE(up.ok()) << up.status();
    ASSERT_TRUE((*up)->WaitReady(absl::Now() + absl::Seconds(20)))
        << (*up)->LastError();
    EXPECT_EQ((*up)->ChangeGranularity(), 4u << 20);
    direct[img.name] = absl::StrCat("nbd+unix:///?socket=",
                                    SpawnedServerSocketForTesting(up->get()));
    std::shared_ptr<Upstream> shared = *std::move(up);
    exports.push_back({img.name, "", shared, false, absl::Seconds(30)});
    upstreams.push_back(std::move(shared));
  }
  ExtentCache cache{ExtentCache::Options()};
  NbdServer server(std::move(exports), &cache, blockmeta::v1::NbdShimConfig());
  const std::string sock = dir.File("shim.sock");
  ASSERT_TRUE(server.Start("", sock).ok());
  std::mt19937 rng(4194304);
  for (const Coarse& img : images) {
    ExpectExactAfterRandomSmallWrites(
        sock, img.name, direct[img.name],
        {"base:allocation", "qemu:dirty-bitmap:b4"}, 32 * kMiB, 16, &rng);
    if (::testing::Test::HasFatalFailure()) break;
  }
  server.Shutdown();
}

TEST_F(ShimIntegrationTest, ManyClientsAtOnce) {
  auto want = Nbdinfo(direct_["fragmented"]);
  ASSERT_TRUE(want.ok());
  std::vector<std::thread> threads;
  threads.reserve(8);
  std::atomic<int> good{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      auto got = i % 2 ? Nbdinfo(ShimUri("fragmented"))
                       : QemuImgMap(ShimUri("fragmented"));
      auto ref = i % 2 ? want : QemuImgMap(direct_["fragmented"]);
      if (got.ok() && ref.ok() && *got == *ref) good.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), 8);
}

TEST_F(ShimIntegrationTest, BadRequestsOverARealSocket) {
  auto c = nbd::testing::RawClient::ConnectUnix(sock_);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE((*c)->Handshake("full", true, {"base:allocation"}).ok());
  auto req = [](uint16_t type, uint64_t off, uint32_t len, uint16_t flags = 0) {
    return nbd::testing::Req(type, off, len, flags, /*handle=*/5);
  };
  struct Case {
    nbd::Request r;
    uint32_t error;
  };
  for (const Case& k : std::vector<Case>{
           {req(42, 0, 1), kNbdEinval},
           {req(nbd::kCmdRead, 16 * kMiB, 512), kNbdEinval},
           {req(nbd::kCmdRead, 0, 0), kNbdEinval},
           {req(nbd::kCmdBlockStatus, 16 * kMiB - 512, 1024), kNbdEinval},
           {req(nbd::kCmdRead, 0, 4096, 1u << 15), kNbdEinval},
           {req(nbd::kCmdBlockStatus, 0, 16 * kMiB, nbd::kCmdFlagReqOne), 0},
       }) {
    auto r = (*c)->Call(k.r);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->error, k.error) << nbd::CommandName(k.r.type);
  }
  // Hang up mid-request; the server stays healthy for the next client.
  ASSERT_TRUE(
      (*c)->Send(nbd::testing::RequestBytes(req(nbd::kCmdWrite, 0, 4096), "xy"))
          .ok());
  c->reset();
  auto got = QemuImgMap(ShimUri("full"));
  ASSERT_TRUE(got.ok()) << got.status();
}

}  // namespace
}  // namespace blockmeta
