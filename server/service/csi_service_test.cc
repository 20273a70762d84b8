// server/service/csi_service_test.cc — the CSI rules without a port:
// Identity answers, snapshot-id resolution (a base snapshot with no export
// of its own), every request error the CSI spec names, max_results 0, and a
// randomized check that ranges strictly increase and never overlap across
// a whole stream and across resumes from starting_offset, against a
// per-byte model of what must be reported.
#include "server/service/csi_service.h"

#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kSize = 1024 * kKiB;
const char kBitmap[] = "qemu:dirty-bitmap:ckpt-1";

absl::Time Deadline() { return absl::Now() + absl::Seconds(10); }

class CsiServiceTest : public ::testing::Test {
 protected:
  void Build(ExtentList allocation, ExtentList dirty,
             CsiServiceOptions options = {}, size_t reply_max = SIZE_MAX) {
    auto disk = std::make_unique<FakeUpstream>(kSize, 4096, false);
    disk->SetContextTruth("base:allocation", std::move(allocation));
    disk->SetContextTruth(kBitmap, std::move(dirty));
    disk->SetReplyExtentsMax(reply_max);
    disk_ = disk.get();
    auto down = std::make_unique<FakeUpstream>(kSize, 4096, false);
    down_ = down.get();
    std::vector<std::pair<v1::ExportConfig, std::unique_ptr<Upstream>>> ex;
    v1::ExportConfig c;
    c.set_name("vol-1-snap-2");
    c.mutable_csi()->set_snapshot_id("snap-2");
    // snap-1 was taken when bitmap ckpt-1 started; it has no export.
    (*c.mutable_csi()->mutable_base_snapshot_bitmaps())["snap-1"] = "ckpt-1";
    ex.emplace_back(c, std::move(disk));
    v1::ExportConfig d;
    d.set_name("other");
    ex.emplace_back(d, std::move(down));
    registry_ = ExportRegistry::FromUpstreams(std::move(ex));
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options{});
    extents_ = std::make_unique<ExtentService>(registry_.get(), cache_.get(),
                                               ExtentService::Options{});
    csi_ = std::make_unique<CsiService>(registry_.get(), extents_.get(),
                                        std::move(options));
  }

  // Every range of one whole stream, checking the per-message rules.
  std::vector<CsiRange> Drain(absl::StatusOr<CsiStream> s,
                              uint32_t expect_per_message) {
    EXPECT_TRUE(s.ok()) << s.status();
    std::vector<CsiRange> all;
    if (!s.ok()) return all;
    for (int guard = 0; guard < 100000; ++guard) {
      absl::StatusOr<CsiChunk> c = csi_->Next(&*s, Deadline());
      EXPECT_TRUE(c.ok()) << c.status();
      if (!c.ok()) return all;
      EXPECT_LE(c->ranges.size(), expect_per_message);
      if (!c->done) EXPECT_EQ(c->ranges.size(), expect_per_message);
      all.insert(all.end(), c->ranges.begin(), c->ranges.end());
      if (c->done) return all;
    }
    ADD_FAILURE() << "stream did not end";
    return all;
  }

  static csi::v1::GetMetadataDeltaRequest Delta(const std::string& base,
                                                const std::string& target,
                                                int64_t start = 0,
                                                int32_t max = 0) {
    csi::v1::GetMetadataDeltaRequest r;
    r.set_base_snapshot_id(base);
    r.set_target_snapshot_id(target);
    r.set_starting_offset(start);
    r.set_max_results(max);
    return r;
  }
  static csi::v1::GetMetadataAllocatedRequest Allocated(const std::string& id,
                                                        int64_t start = 0,
                                                        int32_t max = 0) {
    csi::v1::GetMetadataAllocatedRequest r;
    r.set_snapshot_id(id);
    r.set_starting_offset(start);
    r.set_max_results(max);
    return r;
  }

  FakeUpstream* disk_ = nullptr;
  FakeUpstream* down_ = nullptr;
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<ExtentService> extents_;
  std::unique_ptr<CsiService> csi_;
};

ExtentList Simple() { return {{0, kSize, 0}}; }
ExtentList SimpleDirty() {
  return {{0, 64 * kKiB, 0},
          {64 * kKiB, 64 * kKiB, kStateDirty},
          {128 * kKiB, kSize - 128 * kKiB, 0}};
}

TEST_F(CsiServiceTest, IdentityNamesTheDriverAndAnnouncesSnapshotMetadata) {
  CsiServiceOptions o;
  o.driver_name = "hostpath.csi.k8s.io";
  o.driver_version = "9.8.7";
  Build(Simple(), SimpleDirty(), o);
  csi::v1::GetPluginInfoResponse info = csi_->GetPluginInfo();
  EXPECT_EQ(info.name(), "hostpath.csi.k8s.io");
  EXPECT_EQ(info.vendor_version(), "9.8.7");
  csi::v1::GetPluginCapabilitiesResponse caps = csi_->GetPluginCapabilities();
  ASSERT_EQ(caps.capabilities_size(), 1);
  EXPECT_EQ(caps.capabilities(0).service().type(),
            csi::v1::PluginCapability::Service::SNAPSHOT_METADATA_SERVICE);
}

TEST_F(CsiServiceTest, DefaultDriverNameIsNonEmpty) {
  Build(Simple(), SimpleDirty());
  EXPECT_EQ(csi_->GetPluginInfo().name(), kDefaultCsiDriverName);
  EXPECT_FALSE(csi_->GetPluginInfo().vendor_version().empty());
}

TEST_F(CsiServiceTest, ProbeIsReadyOnlyWhenEveryExportIs) {
  Build(Simple(), SimpleDirty());
  ASSERT_TRUE(csi_->Probe().has_ready());
  EXPECT_TRUE(csi_->Probe().ready().value());
  down_->set_ready(false);
  EXPECT_FALSE(csi_->Probe().ready().value());
  down_->set_ready(true);
  EXPECT_TRUE(csi_->Probe().ready().value());
}

TEST_F(CsiServiceTest, MissingIdsAreInvalidArgument) {
  Build(Simple(), SimpleDirty());
  EXPECT_THAT(csi_->PrepareAllocated(Allocated("")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(csi_->PrepareDelta(Delta("snap-1", "")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(csi_->PrepareDelta(Delta("", "snap-2")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(csi_->PrepareDelta(Delta("", "")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(csi_->PrepareAllocated(Allocated("snap-2", -1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(csi_->PrepareAllocated(Allocated("snap-2", 0, -5)),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(CsiServiceTest, UnknownSnapshotIsNotFoundWithABoundedMessage) {
  Build(Simple(), SimpleDirty());
  absl::Status s = csi_->PrepareAllocated(Allocated("nope")).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_NE(s.message().find("nope"), absl::string_view::npos);
  EXPECT_THAT(csi_->PrepareDelta(Delta("snap-1", "nope")),
              StatusIs(absl::StatusCode::kNotFound));
  std::string huge(100000, 'x');
  s = csi_->PrepareAllocated(Allocated(huge)).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_LT(s.message().size(), 1024u);
}

TEST_F(CsiServiceTest, NoChangeTrackingIsFailedPrecondition) {
  Build(Simple(), SimpleDirty());
  absl::Status s = csi_->PrepareDelta(Delta("snap-0", "snap-2")).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(s.message().find("full backup"), absl::string_view::npos);
  // An export without any bitmap.
  EXPECT_THAT(csi_->PrepareDelta(Delta("snap-1", "other")),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(CsiServiceTest, PastTheEndIsOutOfRange) {
  Build(Simple(), SimpleDirty());
  EXPECT_THAT(csi_->PrepareAllocated(Allocated("snap-2", kSize)),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(csi_->PrepareDelta(Delta("snap-1", "snap-2", kSize + 1)),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_TRUE(csi_->PrepareAllocated(Allocated("snap-2", kSize - 1)).ok());
}

TEST_F(CsiServiceTest, SnapshotIdsResolveWithoutABaseExport) {
  Build(Simple(), SimpleDirty());
  // By csi.snapshot_id, by export name, and a base id that is the bitmap
  // name itself: all the same delta.
  std::vector<CsiRange> want = {{64 * kKiB, 64 * kKiB}};
  EXPECT_EQ(Drain(csi_->PrepareDelta(Delta("snap-1", "snap-2")), 1024), want);
  EXPECT_EQ(Drain(csi_->PrepareDelta(Delta("snap-1", "vol-1-snap-2")), 1024),
            want);
  EXPECT_EQ(Drain(csi_->PrepareDelta(Delta("ckpt-1", "snap-2")), 1024), want);
  EXPECT_EQ(Drain(csi_->PrepareAllocated(Allocated("snap-2")), 1024),
            (std::vector<CsiRange>{{0, kSize}}));
}

TEST_F(CsiServiceTest, MaxResultsZeroIsTheServersChoice) {
  ExtentList dirty;
  for (uint64_t off = 0; off < kSize; off += 8 * kKiB) {
    dirty.push_back({off, 4 * kKiB, kStateDirty});
    dirty.push_back({off + 4 * kKiB, 4 * kKiB, 0});
  }
  CsiServiceOptions o;
  o.default_max_results = 7;
  Build(Simple(), dirty, o);
  std::vector<CsiRange> all =
      Drain(csi_->PrepareDelta(Delta("snap-1", "snap-2", 0, 0)), 7);
  EXPECT_EQ(all.size(), kSize / (8 * kKiB));
  // A caller's value wins.
  all = Drain(csi_->PrepareDelta(Delta("snap-1", "snap-2", 0, 50)), 50);
  EXPECT_EQ(all.size(), kSize / (8 * kKiB));
}

// What must be reported, per byte: the model the stream is checked against.
std::vector<bool> Model(const ExtentList& truth, bool dirty) {
  std::vector<bool> m(kSize, false);
  for (const Extent& e : truth) {
    bool sel =
        dirty ? (e.flags & kStateDirty) != 0 : (e.flags & kStateZero) == 0;
    for (uint64_t b = e.offset; b < e.end(); ++b) m[b] = sel;
  }
  return m;
}

ExtentList RandomTruth(std::mt19937_64* rng, bool dirty) {
  ExtentList out;
  uint64_t off = 0;
  while (off < kSize) {
    // Lengths of any byte count, so boundaries rarely fall on blocks.
    uint64_t len = std::min<uint64_t>(kSize - off, 1 + (*rng)() % (40 * kKiB));
    uint32_t flags = dirty ? ((*rng)() % 2 ? kStateDirty : 0)
                           : static_cast<uint32_t>((*rng)() % 4);
    out.push_back({off, len, flags});
    off += len;
  }
  return out;
}

TEST_F(CsiServiceTest, RangesStrictlyIncreaseAcrossStreamsAndResumes) {
  std::mt19937_64 rng(20261201);
  for (int round = 0; round < 24; ++round) {
    bool dirty = round % 2 == 1;
    uint64_t block = (round / 2) % 3 == 0 ? 0 : (round % 3 == 0 ? 4096 : 65536);
    ExtentList truth = RandomTruth(&rng, dirty);
    CsiServiceOptions o;
    o.fixed_block_size = block;
    o.default_max_results = 1 + rng() % 5;
    if (dirty) {
      Build(Simple(), truth, o, /*reply_max=*/1 + rng() % 7);
    } else {
      Build(truth, SimpleDirty(), o, /*reply_max=*/1 + rng() % 7);
    }
    std::vector<bool> model = Model(truth, dirty);
    std::vector<CsiRange> got;
    int64_t start = static_cast<int64_t>(rng() % (kSize / 4));
    const uint64_t first_start = static_cast<uint64_t>(start);
    while (true) {
      int32_t max = static_cast<int32_t>(rng() % 4);  // 0 = server's choice
      absl::StatusOr<CsiStream> s =
          dirty ? csi_->PrepareDelta(Delta("snap-1", "snap-2", start, max))
                : csi_->PrepareAllocated(Allocated("snap-2", start, max));
      if (s.status().code() == absl::StatusCode::kOutOfRange) break;
      ASSERT_TRUE(s.ok()) << s.status();
      // Take a few messages, then "fail" and resume.
      int messages = 1 + static_cast<int>(rng() % 3);
      bool done = false;
      for (int m = 0; m < messages && !done; ++m) {
        absl::StatusOr<CsiChunk> c = csi_->Next(&*s, Deadline());
        ASSERT_TRUE(c.ok()) << c.status();
        done = c->done;
        for (const CsiRange& r : c->ranges) {
          ASSERT_GT(r.length, 0u);
          if (got.empty()) {
            ASSERT_GT(r.offset + r.length, first_start);
          } else {
            // Strictly increasing, never overlapping.
            ASSERT_GE(r.offset, got.back().offset + got.back().length)
                << "round " << round;
          }
          if (block != 0) {
            ASSERT_EQ(r.offset % block, 0u);
            ASSERT_TRUE(r.length == block || r.offset + r.length == kSize);
          }
          got.push_back(r);
        }
      }
      if (done || got.empty()) {
        if (done) break;
        continue;
      }
      start = static_cast<int64_t>(got.back().offset + got.back().length);
    }
    // Every selected byte from the first start on is covered; nothing
    // outside a range's block (FIXED) or outside the selection (VARIABLE).
    std::vector<bool> covered(kSize, false);
    for (const CsiRange& r : got) {
      for (uint64_t b = r.offset; b < r.offset + r.length; ++b)
        covered[b] = true;
    }
    for (uint64_t b = first_start; b < kSize; ++b) {
      if (model[b]) {
        ASSERT_TRUE(covered[b]) << "round " << round << " " << b;
      }
    }
    for (const CsiRange& r : got) {
      bool any = false;
      // FIXED_LENGTH rounds the start down to its block: the whole block
      // counts; VARIABLE_LENGTH starts at starting_offset.
      for (uint64_t b = block != 0 ? r.offset : std::max(r.offset, first_start);
           b < r.offset + r.length; ++b) {
        if (block == 0) {
          ASSERT_TRUE(model[b]) << "round " << round << " " << b;
        }
        any = any || model[b];
      }
      ASSERT_TRUE(any) << "round " << round;
    }
  }
}

TEST(CsiSocketPathTest, AcceptsTheSpecFormsAndRejectsTheRest) {
  EXPECT_EQ(*CsiSocketPath("unix:///csi/csi.sock"), "/csi/csi.sock");
  EXPECT_EQ(*CsiSocketPath("unix:/csi/csi.sock"), "/csi/csi.sock");
  EXPECT_EQ(*CsiSocketPath("/run/csi/socket"), "/run/csi/socket");
  EXPECT_THAT(CsiSocketPath("tcp://1.2.3.4:5"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CsiSocketPath("csi.sock"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CsiSocketPath("unix://"),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace blockmeta
