// tests/nbd/bitmap_granularity_test.cc — no stale clean or hole after a
// write, whatever the upstream's bitmap granularity, with default settings
// (issue 21 item 1).
//
// One qcow2 image carries three persistent bitmaps, of 64 KiB, 4 MiB and
// 64 MiB granularity (`qemu-img bitmap --add -g`), all clean at the start
// (uniform answers: nothing to learn a granule from), on a 150 MiB disk (the
// last 64 MiB granule is partial). It is served by a real BlockMetaServer,
// either as an `nbd_uri` upstream (our own qemu-nbd) or as an `image`
// upstream (the qemu-nbd blockmetad spawns). Through the shim, qemu-io
// makes sub-4 KiB writes, trims and zeroes at random offsets (first the
// issue's 512-byte write at 7 MiB + 512, and one in the partial tail
// granule). After each one, every context's map through the shim
// (`nbdinfo --map=CONTEXT`) and over gRPC (MapExtents) must equal
// `nbdinfo --map=CONTEXT` of the upstream itself. The shim's cache is warm
// before every operation: each check maps everything through it.
#include <unistd.h>

#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/spawn_dir.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kSize = 150 * kMiB;
constexpr int kRandomOps = 30;

const std::vector<std::string>& Contexts() {
  static const auto* c = new std::vector<std::string>{
      "base:allocation", "qemu:dirty-bitmap:g64k", "qemu:dirty-bitmap:g4m",
      "qemu:dirty-bitmap:g64m"};
  return *c;
}

class BitmapGranularityTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    tmp_ = std::make_unique<TempDir>();
    img_ = tmp_->File("disk.qcow2");
    ASSERT_TRUE(MakeImage(img_, "qcow2", kSize,
                          {"write -P 0x1 0 3M", "write -P 0x2 70M 1M"})
                    .ok());
    for (const auto& [name, g] :
         {std::pair<const char*, const char*>{"g64k", "64K"},
          {"g4m", "4M"},
          {"g64m", "64M"}}) {
      auto r = RunCommand({"qemu-img", "bitmap", "--add", "-g", g, img_, name});
      ASSERT_TRUE(r.ok()) << r.status();
    }
    v1::ServerConfig c;
    c.set_grpc_listen("127.0.0.1:0");
    c.set_metrics_listen("127.0.0.1:0");
    shim_sock_ =
        absl::StrCat("/tmp/bm-gran-", getpid(), "-", GetParam(), ".sock");
    c.set_nbd_unix_socket(shim_sock_);
    v1::ExportConfig* e = c.add_exports();
    e->set_name("disk");
    if (GetParam() == "nbd_uri") {
      auto q =
          NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2",
                             "--persistent", "--shared=0", "--discard=unmap",
                             "-B", "g64k", "-B", "g4m", "-B", "g64m", img_});
      ASSERT_TRUE(q.ok()) << q.status();
      qemu_ = *std::move(q);
      e->set_nbd_uri(qemu_->uri());
    } else {
      v1::ImageUpstream* i = e->mutable_image();
      i->set_path(img_);
      for (const char* b : {"g64k", "g4m", "g64m"}) i->add_bitmaps(b);
    }
    auto server = ::blockmeta::testing::StartServer(c);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = ::blockmeta::testing::LoopbackChannel(*server_);
    absl::Status ready = ::blockmeta::testing::WaitExportsReady(channel_, 1);
    ASSERT_TRUE(ready.ok()) << ready;
    upstream_uri_ = qemu_ != nullptr
                        ? qemu_->uri()
                        : absl::StrCat("nbd+unix:///?socket=",
                                       testing::SpawnedServerSocket(getpid()));
    ASSERT_FALSE(absl::EndsWith(upstream_uri_, "=")) << "no spawned socket";
    shim_uri_ = absl::StrCat("nbd+unix:///disk?socket=", shim_sock_);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
    server_.reset();
    qemu_.reset();
    ::unlink(shim_sock_.c_str());
  }

  ExtentList GrpcMap(const std::string& context) {
    auto stub = v1::BlockMeta::NewStub(channel_);
    v1::MapExtentsRequest req;
    req.set_export_name("disk");
    req.set_context(context);
    req.set_coalesce(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    auto reader = stub->MapExtents(&ctx, req);
    v1::MapExtentsResponse msg;
    ExtentList out;
    while (reader->Read(&msg)) {
      for (const v1::Extent& x : msg.extents()) {
        out.push_back(Extent{x.offset(), x.length(), x.nbd_flags()});
      }
    }
    grpc::Status s = reader->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  // Every context, through the shim and over gRPC, against the upstream.
  void CheckEveryContext(const std::string& after) {
    for (const std::string& context : Contexts()) {
      SCOPED_TRACE(absl::StrCat(context, " after ", after));
      absl::StatusOr<ExtentList> want = NbdinfoMap(upstream_uri_, context);
      ASSERT_TRUE(want.ok()) << want.status();
      absl::StatusOr<ExtentList> shim = NbdinfoMap(shim_uri_, context);
      ASSERT_TRUE(shim.ok()) << shim.status();
      ASSERT_EQ(MergeAdjacent(*shim), MergeAdjacent(*want));
      ASSERT_EQ(MergeAdjacent(GrpcMap(context)), MergeAdjacent(*want));
    }
  }

  std::unique_ptr<TempDir> tmp_;
  std::string img_;
  std::unique_ptr<NbdProcess> qemu_;
  std::unique_ptr<BlockMetaServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::string shim_sock_, shim_uri_, upstream_uri_;
};

TEST_P(BitmapGranularityTest, EveryContextEqualsTheUpstreamAfterEachWrite) {
  CheckEveryContext("nothing (clean bitmaps: uniform answers)");
  if (HasFatalFailure()) return;
  std::vector<std::string> ops = {
      absl::StrCat("write -P 0x7 ", 7 * kMiB + 512, " 512"),  // the issue's
      absl::StrCat("write -P 0x8 ", kSize - 1024, " 1024"),   // tail granule
  };
  std::mt19937_64 rng(21);
  for (int i = 0; i < kRandomOps; ++i) {
    const uint64_t len = 512 * (1 + rng() % 7);  // 512 .. 3584 bytes
    const uint64_t off = 512 * (rng() % ((kSize - len) / 512));
    static const char* const kKinds[] = {"write -P 0x9", "discard", "write -z"};
    ops.push_back(absl::StrCat(kKinds[rng() % 3], " ", off, " ", len));
  }
  for (const std::string& op : ops) {
    absl::Status s = QemuIo(shim_uri_, "raw", {op});
    ASSERT_TRUE(s.ok()) << op << ": " << s;
    CheckEveryContext(op);
    if (HasFatalFailure()) return;
  }
  // What correctness costs: upstream commands (block status, and the
  // writes themselves) over all the maps above (printed, not asserted).
  const double commands =
      ::blockmeta::testing::UpstreamCommandsSent(*server_, "disk");
  std::cerr << GetParam() << ": " << ops.size() << " operations, "
            << ops.size() + 1 << " x " << Contexts().size()
            << " maps through the shim and over gRPC each: " << commands
            << " upstream commands\n";
  RecordProperty("upstream_commands", static_cast<int64_t>(commands));
}

INSTANTIATE_TEST_SUITE_P(Upstreams, BitmapGranularityTest,
                         ::testing::Values("nbd_uri", "image"));

}  // namespace
}  // namespace blockmeta
