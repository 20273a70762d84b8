// tests/service/multi_context_e2e_test.cc — changed-and-allocated in one
// query, end to end: a qcow2 with a persistent dirty bitmap where, after
// the checkpoint, data was written, zeroed (write -z) and discarded,
// served by a real qemu-nbd behind a real BlockMetaServer. GetExtents and
// MapExtents over base:allocation + qemu:dirty-bitmap:ckpt are compared
// byte for byte with `nbdinfo --map` of each context, and CSI
// GetMetadataDelta still reports every changed block, zeroed or not.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 16 * kMiB;
const char kBitmap[] = "qemu:dirty-bitmap:ckpt";

// The flags of `map` at `byte`.
uint32_t At(const ExtentList& map, uint64_t byte) {
  for (const Extent& e : map) {
    if (byte >= e.offset && byte < e.end()) return e.flags;
  }
  ADD_FAILURE() << "map does not cover " << byte;
  return ~0u;
}

class MultiContextE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    std::string img = tmp_->File("disk.qcow2");
    ASSERT_TRUE(MakeImage(img, "qcow2", kSize,
                          {"write -P 0x1 0 4M", "write -P 0x2 8M 4M"})
                    .ok());
    ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "ckpt"}).ok());
    // After the checkpoint: new data, zeroes over old data, a discard, and
    // data written into a hole, each at offsets no cluster lines up with.
    ASSERT_TRUE(
        QemuIo(img, "qcow2",
               {"write -P 0x3 1M 192k", "write -z 2M 320k", "discard 9M 1M",
                "write -P 0x4 14M 64k", "write -z 5M 128k"})
            .ok());
    auto q = NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2",
                                "--persistent", "--shared=8", "-B", "ckpt",
                                "-r", img});
    ASSERT_TRUE(q.ok()) << q.status();
    qemu_ = q->release();
    v1::ServerConfig config;
    config.set_grpc_listen("127.0.0.1:0");
    v1::ExportConfig* e = config.add_exports();
    e->set_name("disk");
    e->set_nbd_uri(qemu_->uri());
    auto server = ::blockmeta::testing::StartServer(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    channel_ = new std::shared_ptr<grpc::Channel>(
        ::blockmeta::testing::LoopbackChannel(*server_));
    absl::Status ready = ::blockmeta::testing::WaitExportsReady(*channel_, 1);
    ASSERT_TRUE(ready.ok()) << ready;
    auto alloc = NbdinfoMap(qemu_->uri());
    ASSERT_TRUE(alloc.ok()) << alloc.status();
    alloc_ = new ExtentList(*alloc);
    auto dirty = NbdinfoMap(qemu_->uri(), kBitmap);
    ASSERT_TRUE(dirty.ok()) << dirty.status();
    dirty_ = new ExtentList(*dirty);
  }

  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
    delete server_;
    delete channel_;
    delete qemu_;
    delete alloc_;
    delete dirty_;
    delete tmp_;
  }

  // Every byte of `extents` against nbdinfo's map of each context.
  static void CheckBytes(const std::vector<v1::Extent>& extents) {
    uint64_t pos = 0;
    for (const v1::Extent& e : extents) {
      ASSERT_EQ(e.offset(), pos);
      ASSERT_EQ(e.contexts_size(), 2);
      // Boundaries of either map fall inside an extent only if neither
      // context changes there: check at each 512-byte sector.
      for (uint64_t b = e.offset(); b < e.offset() + e.length(); b += 512) {
        ASSERT_EQ(e.contexts(0).nbd_flags(), At(*alloc_, b)) << b;
        ASSERT_EQ(e.contexts(1).nbd_flags(), At(*dirty_, b)) << b;
      }
      ASSERT_EQ(e.zero(), e.contexts(0).zero());
      ASSERT_EQ(e.hole(), e.contexts(0).hole());
      ASSERT_EQ(e.dirty(), e.contexts(1).dirty());
      pos = e.offset() + e.length();
    }
    ASSERT_EQ(pos, kSize);
  }

  static TempDir* tmp_;
  static NbdProcess* qemu_;
  static BlockMetaServer* server_;
  static std::shared_ptr<grpc::Channel>* channel_;
  static ExtentList* alloc_;
  static ExtentList* dirty_;
};

TempDir* MultiContextE2eTest::tmp_ = nullptr;
NbdProcess* MultiContextE2eTest::qemu_ = nullptr;
BlockMetaServer* MultiContextE2eTest::server_ = nullptr;
std::shared_ptr<grpc::Channel>* MultiContextE2eTest::channel_ = nullptr;
ExtentList* MultiContextE2eTest::alloc_ = nullptr;
ExtentList* MultiContextE2eTest::dirty_ = nullptr;

TEST_F(MultiContextE2eTest, TheFixtureHasChangedDataZeroesAndDiscards) {
  // Changed and zero, changed and data, unchanged data: all three occur.
  bool dirty_zero = false, dirty_data = false, clean_data = false;
  for (uint64_t b = 0; b < kSize; b += 64 * 1024) {
    bool d = At(*dirty_, b) & kStateDirty, z = At(*alloc_, b) & kStateZero;
    dirty_zero |= d && z;
    dirty_data |= d && !z;
    clean_data |= !d && !z;
  }
  EXPECT_TRUE(dirty_zero);
  EXPECT_TRUE(dirty_data);
  EXPECT_TRUE(clean_data);
}

TEST_F(MultiContextE2eTest, GetExtentsMatchesNbdinfoOfEachContext) {
  auto stub = v1::BlockMeta::NewStub(*channel_);
  std::vector<v1::Extent> all;
  uint64_t off = 0;
  while (off < kSize) {
    v1::GetExtentsRequest req;
    req.set_export_name("disk");
    req.set_offset(off);
    req.set_length(kSize - off);
    req.set_max_extents(3);
    req.add_contexts("base:allocation");
    req.add_contexts(kBitmap);
    grpc::ClientContext ctx;
    v1::GetExtentsResponse r;
    grpc::Status s = stub->GetExtents(&ctx, req, &r);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(r.contexts_size(), 2);
    ASSERT_GT(r.next_offset(), off);
    all.insert(all.end(), r.extents().begin(), r.extents().end());
    off = r.next_offset();
  }
  CheckBytes(all);
}

TEST_F(MultiContextE2eTest, MapExtentsMatchesNbdinfoOfEachContext) {
  auto stub = v1::BlockMeta::NewStub(*channel_);
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  req.set_batch_size(2);
  req.set_coalesce(true);
  req.add_contexts("base:allocation");
  req.add_contexts(kBitmap);
  grpc::ClientContext ctx;
  auto reader = stub->MapExtents(&ctx, req);
  v1::MapExtentsResponse msg;
  std::vector<v1::Extent> all;
  while (reader->Read(&msg)) {
    EXPECT_LE(msg.extents_size(), 2);
    all.insert(all.end(), msg.extents().begin(), msg.extents().end());
  }
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  CheckBytes(all);
  // Coalesced: no two neighbours with the same flags in both contexts.
  for (size_t i = 1; i < all.size(); ++i) {
    EXPECT_FALSE(
        all[i].contexts(0).nbd_flags() == all[i - 1].contexts(0).nbd_flags() &&
        all[i].contexts(1).nbd_flags() == all[i - 1].contexts(1).nbd_flags())
        << all[i].offset();
  }
}

TEST_F(MultiContextE2eTest, CsiDeltaStillReportsZeroedChangedBlocks) {
  auto csi = csi::v1::SnapshotMetadata::NewStub(*channel_);
  grpc::ClientContext ctx;
  csi::v1::GetMetadataDeltaRequest req;
  req.set_base_snapshot_id("ckpt");
  req.set_target_snapshot_id("disk");
  auto reader = csi->GetMetadataDelta(&ctx, req);
  csi::v1::GetMetadataDeltaResponse msg;
  std::vector<bool> reported(kSize / 512, false);
  while (reader->Read(&msg)) {
    for (const auto& b : msg.block_metadata()) {
      for (int64_t s = b.byte_offset(); s < b.byte_offset() + b.size_bytes();
           s += 512) {
        reported[s / 512] = true;
      }
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  for (uint64_t b = 0; b < kSize; b += 512) {
    ASSERT_EQ(reported[b / 512], (At(*dirty_, b) & kStateDirty) != 0) << b;
  }
}

}  // namespace
}  // namespace blockmeta
