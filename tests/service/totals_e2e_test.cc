// tests/service/totals_e2e_test.cc — BlockMeta.GetTotals end to end on
// real upstreams behind a real BlockMetaServer, against sums over
// `nbdinfo --map` of the same upstream:
// * a qcow2 with a persistent dirty bitmap (qemu-nbd) where, after the
//   checkpoint, data was written, zeroed and discarded: base:allocation
//   and qemu:dirty-bitmap:ckpt totals, their cross totals (dirty_data,
//   dirty_nonzero) and random sub-ranges;
// * nbdkit sparse-random (64 GiB: many fetch windows) and data plugins;
// * GetExportInfo answers the size without any upstream block-status call;
//   a repeated GetTotals is a cache hit with no upstream call;
// * CSI GetMetadataAllocated / GetMetadataDelta ranges add up to
//   `nonzero` / `dirty` (the mapping docs/api.md states);
// * error codes, the server's deadline (what was fetched stays cached),
//   admission, and a cancelled call freeing its ticket long before its
//   upstream answer comes (nbdkit delay filter).
#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::Slice;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kQcowSize = 16 * kMiB;
constexpr uint64_t kSparseSize = 64ull << 30;
const char kAlloc[] = "base:allocation";
const char kBitmap[] = "qemu:dirty-bitmap:ckpt";

// Totals computed from nbdinfo's maps of [off, end): `alloc` and, when not
// null, `dirty` (cut at the union of both maps' boundaries).
struct Sums {
  uint64_t data = 0, hole = 0, zero = 0, nonzero = 0;
  uint64_t dirty = 0, clean = 0, dirty_data = 0, dirty_nonzero = 0;
  uint64_t alloc_runs = 0, dirty_runs = 0;
  std::map<uint32_t, uint64_t> alloc_by_flags, dirty_by_flags;
};

Sums FromNbdinfo(const ExtentList& alloc_map, const ExtentList* dirty_map,
                 uint64_t off, uint64_t end) {
  Sums s;
  const ExtentList a = Slice(alloc_map, off, end - off);
  s.alloc_runs = MergeAdjacent(a).size();
  for (const Extent& e : a) {
    ((e.flags & kStateHole) ? s.hole : s.data) += e.length;
    ((e.flags & kStateZero) ? s.zero : s.nonzero) += e.length;
    s.alloc_by_flags[e.flags] += e.length;
  }
  if (dirty_map == nullptr) return s;
  const ExtentList d = Slice(*dirty_map, off, end - off);
  s.dirty_runs = MergeAdjacent(d).size();
  for (const Extent& e : d) {
    ((e.flags & kStateDirty) ? s.dirty : s.clean) += e.length;
    s.dirty_by_flags[e.flags] += e.length;
  }
  // The cross totals: walk both lists together.
  size_t i = 0, j = 0;
  uint64_t pos = off;
  while (pos < end && i < a.size() && j < d.size()) {
    const uint64_t stop = std::min(a[i].end(), d[j].end());
    if (d[j].flags & kStateDirty) {
      if (!(a[i].flags & kStateHole)) s.dirty_data += stop - pos;
      if (!(a[i].flags & kStateZero)) s.dirty_nonzero += stop - pos;
    }
    pos = stop;
    if (a[i].end() == stop) ++i;
    if (d[j].end() == stop) ++j;
  }
  EXPECT_EQ(pos, end) << "nbdinfo maps do not cover the range";
  return s;
}

std::map<uint32_t, uint64_t> ByFlags(const v1::ContextTotals& t) {
  std::map<uint32_t, uint64_t> out;
  for (const v1::FlagsTotal& f : t.by_flags()) out[f.flags()] = f.bytes();
  return out;
}

class TotalsE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    std::string img = tmp_->File("disk.qcow2");
    ASSERT_TRUE(MakeImage(img, "qcow2", kQcowSize,
                          {"write -P 0x1 0 4M", "write -P 0x2 8M 4M"})
                    .ok());
    ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "ckpt"}).ok());
    // After the checkpoint: new data over old, zeroes over old data, a
    // discard, data into a hole, zeroes into a hole; unaligned to clusters.
    ASSERT_TRUE(
        QemuIo(img, "qcow2",
               {"write -P 0x3 1M 192k", "write -z 2M 320k", "discard 9M 1M",
                "write -P 0x4 14M 64k", "write -z 5M 128k"})
            .ok());
    qemu_ = Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2", "--persistent",
                   "--shared=8", "-B", "ckpt", "-r", img});
    sparse_ = Start({"nbdkit", "-f", "-U", "{sock}", "sparse-random",
                     absl::StrCat("size=", kSparseSize), "seed=2026",
                     "percent=30", "runlength=8388608"});
    data_ = Start({"nbdkit", "-f", "-U", "{sock}", "data",
                   absl::StrCat("data=@4096 1 2 3 @65536 (9)*70000 ",
                                "@1048576 (0)*8192 @2097152 (7)*512"),
                   "size=3M"});
    slow_ = Start({"nbdkit", "-f", "-U", "{sock}", "--filter=delay", "memory",
                   "64M", "delay-extents=10000ms"});
    if (HasFatalFailure()) return;
    v1::ServerConfig config;
    config.set_grpc_listen("127.0.0.1:0");
    // Calls without a deadline get 1.5 s: the deadline test relies on it.
    config.mutable_grpc()->set_default_deadline_ms(1500);
    config.mutable_grpc()->set_max_inflight_calls_per_export(1);
    auto add = [&](const std::string& name, const std::string& uri) {
      v1::ExportConfig* e = config.add_exports();
      e->set_name(name);
      e->set_nbd_uri(uri);
    };
    add("qcow", qemu_->uri());
    add("sparse", sparse_->uri());
    add("data", data_->uri());
    add("slow-deadline", slow_->uri());
    add("slow-cancel", slow_->uri());
    auto server = ::blockmeta::testing::StartServer(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    channel_ = new std::shared_ptr<grpc::Channel>(
        ::blockmeta::testing::LoopbackChannel(*server_));
    absl::Status ready = ::blockmeta::testing::WaitExportsReady(*channel_, 5);
    ASSERT_TRUE(ready.ok()) << ready;
  }

  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
    delete server_;
    delete channel_;
    delete qemu_;
    delete sparse_;
    delete data_;
    delete slow_;
    delete tmp_;
  }

  static NbdProcess* Start(const std::vector<std::string>& argv) {
    auto p = NbdProcess::Start(argv);
    EXPECT_TRUE(p.ok()) << argv[0] << ": " << p.status();
    return p.ok() ? p->release() : nullptr;
  }

  static v1::GetTotalsRequest Request(const std::string& name,
                                      std::vector<std::string> contexts,
                                      uint64_t off = 0, uint64_t len = 0) {
    v1::GetTotalsRequest r;
    r.set_export_name(name);
    for (std::string& c : contexts) r.add_contexts(std::move(c));
    r.set_offset(off);
    r.set_length(len);
    return r;
  }

  // deadline zero: the server's default.
  static grpc::Status Totals(const v1::GetTotalsRequest& req,
                             v1::GetTotalsResponse* out,
                             absl::Duration deadline = absl::Seconds(120)) {
    grpc::ClientContext ctx;
    if (deadline > absl::ZeroDuration()) {
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    }
    return v1::BlockMeta::NewStub(*channel_)->GetTotals(&ctx, req, out);
  }

  static v1::ExportStats Stats(const std::string& name) {
    grpc::ClientContext ctx;
    v1::GetStatsRequest req;
    req.set_export_name(name);
    v1::GetStatsResponse r;
    grpc::Status s = v1::BlockMeta::NewStub(*channel_)->GetStats(&ctx, req, &r);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return r.exports_size() == 1 ? r.exports(0) : v1::ExportStats();
  }

  static void ExpectAllocation(const v1::ContextTotals& t, const Sums& s) {
    EXPECT_EQ(t.context(), kAlloc);
    EXPECT_EQ(t.data(), s.data);
    EXPECT_EQ(t.hole(), s.hole);
    EXPECT_EQ(t.zero(), s.zero);
    EXPECT_EQ(t.nonzero(), s.nonzero);
    EXPECT_EQ(t.extents(), s.alloc_runs);
    EXPECT_EQ(ByFlags(t), s.alloc_by_flags);
    EXPECT_FALSE(t.by_flags_truncated());
  }

  static TempDir* tmp_;
  static NbdProcess *qemu_, *sparse_, *data_, *slow_;
  static BlockMetaServer* server_;
  static std::shared_ptr<grpc::Channel>* channel_;
};

TempDir* TotalsE2eTest::tmp_ = nullptr;
NbdProcess* TotalsE2eTest::qemu_ = nullptr;
NbdProcess* TotalsE2eTest::sparse_ = nullptr;
NbdProcess* TotalsE2eTest::data_ = nullptr;
NbdProcess* TotalsE2eTest::slow_ = nullptr;
BlockMetaServer* TotalsE2eTest::server_ = nullptr;
std::shared_ptr<grpc::Channel>* TotalsE2eTest::channel_ = nullptr;

TEST_F(TotalsE2eTest, QcowBitmapTotalsEqualSumsOverNbdinfoMap) {
  // The size comes without touching the map: no block-status call yet.
  {
    grpc::ClientContext ctx;
    v1::GetExportInfoRequest req;
    req.set_export_name("qcow");
    v1::ExportInfo info;
    ASSERT_TRUE(v1::BlockMeta::NewStub(*channel_)
                    ->GetExportInfo(&ctx, req, &info)
                    .ok());
    EXPECT_EQ(info.size(), kQcowSize);
    EXPECT_EQ(Stats("qcow").upstream_calls(), 0u);
  }
  auto alloc = NbdinfoMap(qemu_->uri(), kAlloc);
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  auto dirty = NbdinfoMap(qemu_->uri(), kBitmap);
  ASSERT_TRUE(dirty.ok()) << dirty.status();
  const Sums want = FromNbdinfo(*alloc, &*dirty, 0, kQcowSize);
  // The fixture has changed data, changed zeroes, unchanged data, holes.
  EXPECT_GT(want.dirty_nonzero, 0u);
  EXPECT_GT(want.dirty - want.dirty_nonzero, 0u);
  EXPECT_GT(want.nonzero, want.dirty_nonzero);
  EXPECT_GT(want.hole, 0u);

  v1::GetTotalsResponse r;
  grpc::Status s = Totals(Request("qcow", {kAlloc, kBitmap}), &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(r.export_name(), "qcow");
  EXPECT_EQ(r.export_size(), kQcowSize);
  EXPECT_EQ(r.offset(), 0u);
  EXPECT_EQ(r.length(), kQcowSize);
  EXPECT_NE(r.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  ASSERT_EQ(r.contexts_size(), 2);
  ExpectAllocation(r.contexts(0), want);
  const v1::ContextTotals& d = r.contexts(1);
  EXPECT_EQ(d.context(), kBitmap);
  EXPECT_EQ(d.dirty(), want.dirty);
  EXPECT_EQ(d.clean(), want.clean);
  ASSERT_TRUE(d.has_dirty_data());
  EXPECT_EQ(d.dirty_data(), want.dirty_data);
  ASSERT_TRUE(d.has_dirty_nonzero());
  EXPECT_EQ(d.dirty_nonzero(), want.dirty_nonzero);
  EXPECT_EQ(d.extents(), want.dirty_runs);
  EXPECT_EQ(ByFlags(d), want.dirty_by_flags);

  // Again: every byte from the cache; the upstream is not asked.
  const uint64_t calls = Stats("qcow").upstream_calls();
  EXPECT_GT(calls, 0u);
  v1::GetTotalsResponse again;
  ASSERT_TRUE(Totals(Request("qcow", {kAlloc, kBitmap}), &again).ok());
  EXPECT_EQ(again.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(again.contexts(1).dirty_nonzero(), want.dirty_nonzero);
  EXPECT_EQ(Stats("qcow").upstream_calls(), calls);

  // Random sub-ranges (from the cache) against slices of the same maps.
  std::mt19937_64 rng(18634);
  for (int i = 0; i < 20; ++i) {
    const uint64_t off = (rng() % (kQcowSize / 512)) * 512 + rng() % 2;
    const uint64_t len = 1 + rng() % (kQcowSize - off);
    SCOPED_TRACE(absl::StrCat(off, "+", len));
    const Sums w = FromNbdinfo(*alloc, &*dirty, off, off + len);
    v1::GetTotalsResponse part;
    ASSERT_TRUE(
        Totals(Request("qcow", {kBitmap, kAlloc}, off, len), &part).ok());
    EXPECT_EQ(part.offset(), off);
    EXPECT_EQ(part.length(), len);
    ExpectAllocation(part.contexts(1), w);
    EXPECT_EQ(part.contexts(0).dirty(), w.dirty);
    EXPECT_EQ(part.contexts(0).dirty_data(), w.dirty_data);
    EXPECT_EQ(part.contexts(0).dirty_nonzero(), w.dirty_nonzero);
  }
  EXPECT_EQ(Stats("qcow").upstream_calls(), calls);
}

// docs/api.md: CSI VARIABLE_LENGTH ranges add up to `nonzero`
// (GetMetadataAllocated) and to the bitmap's `dirty` (GetMetadataDelta).
TEST_F(TotalsE2eTest, CsiRangesAddUpToNonzeroAndDirty) {
  auto csi = csi::v1::SnapshotMetadata::NewStub(*channel_);
  // A stream frees its admission ticket just after its client saw the
  // end, and this server admits one call per export: a call right after
  // may be RESOURCE_EXHAUSTED, so each call is retried until it is not.
  uint64_t allocated = 0, changed = 0;
  grpc::Status s;
  ASSERT_TRUE(Eventually([&] {
    allocated = 0;
    grpc::ClientContext ctx;
    csi::v1::GetMetadataAllocatedRequest req;
    req.set_snapshot_id("qcow");
    auto reader = csi->GetMetadataAllocated(&ctx, req);
    csi::v1::GetMetadataAllocatedResponse msg;
    while (reader->Read(&msg)) {
      for (const auto& b : msg.block_metadata()) allocated += b.size_bytes();
    }
    s = reader->Finish();
    return s.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED;
  }));
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_TRUE(Eventually([&] {
    changed = 0;
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id("ckpt");
    req.set_target_snapshot_id("qcow");
    auto reader = csi->GetMetadataDelta(&ctx, req);
    csi::v1::GetMetadataDeltaResponse msg;
    while (reader->Read(&msg)) {
      for (const auto& b : msg.block_metadata()) changed += b.size_bytes();
    }
    s = reader->Finish();
    return s.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED;
  }));
  ASSERT_TRUE(s.ok()) << s.error_message();
  v1::GetTotalsResponse r;
  ASSERT_TRUE(Eventually([&] {
    s = Totals(Request("qcow", {kAlloc, kBitmap}), &r);
    return s.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED;
  }));
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_GT(allocated, 0u);
  EXPECT_EQ(r.contexts(0).nonzero(), allocated);
  EXPECT_GT(changed, 0u);
  EXPECT_EQ(r.contexts(1).dirty(), changed);
}

TEST_F(TotalsE2eTest, BitmapAloneHasNoCrossTotals) {
  auto dirty = NbdinfoMap(qemu_->uri(), kBitmap);
  ASSERT_TRUE(dirty.ok()) << dirty.status();
  v1::GetTotalsResponse r;
  ASSERT_TRUE(Totals(Request("qcow", {kBitmap}), &r).ok());
  ASSERT_EQ(r.contexts_size(), 1);
  const Sums want = FromNbdinfo(*dirty, &*dirty, 0, kQcowSize);
  EXPECT_EQ(r.contexts(0).dirty(), want.dirty);
  EXPECT_FALSE(r.contexts(0).has_dirty_data());
  EXPECT_FALSE(r.contexts(0).has_dirty_nonzero());
}

TEST_F(TotalsE2eTest, SparseRandomManyWindowsEqualsNbdinfoMap) {
  auto alloc = NbdinfoMap(sparse_->uri(), kAlloc);
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  const Sums want = FromNbdinfo(*alloc, nullptr, 0, kSparseSize);
  EXPECT_GT(want.data, 0u);
  EXPECT_GT(want.hole, 0u);
  EXPECT_GT(want.alloc_runs, 1000u);  // a fragmented disk
  v1::GetTotalsResponse r;
  grpc::Status s = Totals(Request("sparse", {}), &r);  // default context
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(r.length(), kSparseSize);
  ASSERT_EQ(r.contexts_size(), 1);
  ExpectAllocation(r.contexts(0), want);
  EXPECT_EQ(r.extents(), want.alloc_runs);
  // One upstream call per fetch window (~4 GiB), not per extent.
  EXPECT_LE(Stats("sparse").upstream_calls(), kSparseSize / (4ull << 30) + 2);
  // A range across window boundaries, from the cache.
  const uint64_t off = (5ull << 30) + 12345, len = 21ull << 30;
  v1::GetTotalsResponse part;
  ASSERT_TRUE(Totals(Request("sparse", {kAlloc}, off, len), &part).ok());
  EXPECT_EQ(part.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  ExpectAllocation(part.contexts(0),
                   FromNbdinfo(*alloc, nullptr, off, off + len));
}

TEST_F(TotalsE2eTest, DataPluginEqualsNbdinfoMap) {
  auto alloc = NbdinfoMap(data_->uri(), kAlloc);
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  v1::GetTotalsResponse r;
  ASSERT_TRUE(Totals(Request("data", {""}), &r).ok());
  ExpectAllocation(r.contexts(0), FromNbdinfo(*alloc, nullptr, 0, 3 * kMiB));
  // Past the end is clipped, like MapExtents.
  ASSERT_TRUE(Totals(Request("data", {}, kMiB, 100 * kMiB), &r).ok());
  EXPECT_EQ(r.length(), 2 * kMiB);
  ExpectAllocation(r.contexts(0), FromNbdinfo(*alloc, nullptr, kMiB, 3 * kMiB));
}

TEST_F(TotalsE2eTest, ErrorCodes) {
  v1::GetTotalsResponse r;
  EXPECT_THAT(Totals(Request("nope", {}), &r),
              StatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(Totals(Request("qcow", {}, kQcowSize), &r),
              StatusIs(grpc::StatusCode::OUT_OF_RANGE));
  EXPECT_THAT(Totals(Request("data", {kBitmap}), &r),
              StatusIs(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_THAT(Totals(Request("qcow", {kAlloc, ""}), &r),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  grpc::Status s = Totals(Request("qcow", {std::string(70000, 'q')}), &r);
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_LT(s.error_message().size(), 512u);
}

TEST_F(TotalsE2eTest, ServerDeadlineSaysHowFarAndKeepsTheFetch) {
  // No client deadline: the server's 1.5 s default ends the call while the
  // upstream takes 10 s; its message says how far the walk got.
  v1::GetTotalsResponse r;
  grpc::Status s =
      Totals(Request("slow-deadline", {}), &r, absl::ZeroDuration());
  ASSERT_THAT(s, StatusIs(grpc::StatusCode::DEADLINE_EXCEEDED))
      << s.error_message();
  EXPECT_NE(s.error_message().find("0 of 67108864 bytes from offset 0"),
            std::string::npos)
      << s.error_message();
  // The fetch ran on and was cached: a later call asks nothing more.
  const uint64_t calls = Stats("slow-deadline").upstream_calls();
  EXPECT_EQ(calls, 1u);
  s = Totals(Request("slow-deadline", {}), &r, absl::Seconds(60));
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(r.contexts(0).hole(), 64 * kMiB);
  EXPECT_EQ(Stats("slow-deadline").upstream_calls(), calls);
}

TEST_F(TotalsE2eTest, AdmissionAndCancellation) {
  // A call waiting on a 10 s upstream holds the export's only ticket.
  auto stub = v1::BlockMeta::NewStub(*channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  v1::GetTotalsRequest req = Request("slow-cancel", {});
  v1::GetTotalsResponse first;
  absl::Notification done;
  grpc::Status first_status;
  stub->async()->GetTotals(&ctx, &req, &first, [&](grpc::Status s) {
    first_status = std::move(s);
    done.Notify();
  });
  // Asked (the cache counts a call when it issues it): the ticket is held.
  ASSERT_TRUE(
      Eventually([&] { return Stats("slow-cancel").upstream_calls() > 0; }));
  v1::GetTotalsResponse r;
  EXPECT_THAT(Totals(req, &r, absl::Seconds(1)),
              StatusIs(grpc::StatusCode::RESOURCE_EXHAUSTED));
  // Cancelled: the server notices within a slice and frees the ticket long
  // before the upstream answers (10 s after it was asked).
  const absl::Time cancelled = absl::Now();
  ctx.TryCancel();
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_THAT(first_status, StatusIs(grpc::StatusCode::CANCELLED));
  grpc::StatusCode code = grpc::StatusCode::RESOURCE_EXHAUSTED;
  ASSERT_TRUE(Eventually(
      [&] {
        code = Totals(req, &r, absl::Milliseconds(200)).error_code();
        return code != grpc::StatusCode::RESOURCE_EXHAUSTED;
      },
      absl::Seconds(20)));
  EXPECT_LT(absl::Now() - cancelled, absl::Seconds(6));
}

}  // namespace
}  // namespace blockmeta
