// server/upstream/store_upstream_test.cc — the store decorator over real
// nbdkit and qemu-nbd upstreams: answers are written through and read back
// after a reopen with only the verification call reaching the upstream
// (counted by nbdkit's log filter); different content under the same
// identity fails the check and is never served; a rewritten image gets a new
// identity; writes are refused.
#include "server/upstream/store_upstream.h"

#include <sys/time.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/store/content_identity.h"
#include "server/store/extent_store.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_upstream_test_util.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using testing::MergeAdjacent;
using testing::TempDir;

// Block-status calls nbdkit's log filter saw ("connection=N Extents id=").
int LoggedExtentsCalls(const std::string& log) {
  std::ifstream in(log);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (absl::StrContains(line, " Extents id=") &&
        !absl::StrContains(line, "...Extents")) {
      ++n;
    }
  }
  return n;
}

// The whole map through `up`, one call after another from each answer's end.
ExtentList MapAll(Upstream& up,
                  const std::string& context = "base:allocation") {
  absl::StatusOr<UpstreamInfo> info = up.Info();
  EXPECT_TRUE(info.ok()) << info.status();
  ExtentList out;
  uint64_t pos = 0;
  while (info.ok() && pos < info->size) {
    absl::StatusOr<ExtentList> got = up.BlockStatus(
        context, pos, std::min<uint64_t>(info->size - pos, uint64_t{1} << 30),
        Soon());
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok() || got->empty()) break;
    for (Extent e : *got) {
      if (e.offset >= info->size) break;
      e.length = std::min(e.end(), info->size) - e.offset;
      out.push_back(e);
    }
    pos = out.back().end();
  }
  return MergeAdjacent(out);
}

class StoreUpstreamTest : public ::testing::Test {
 protected:
  std::shared_ptr<ExtentStore> OpenStore() {
    ExtentStoreOptions o;
    o.path = dir_.File("store");
    absl::StatusOr<std::shared_ptr<ExtentStore>> s = ExtentStore::Open(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : nullptr;
  }
  std::unique_ptr<StoreUpstream> Wrap(const v1::ExportConfig& config,
                                      std::shared_ptr<ExtentStore> store,
                                      const std::string& identity) {
    std::unique_ptr<Upstream> inner = Connect(config);
    if (inner == nullptr) return nullptr;
    StoreUpstream::Options o;
    o.export_name = config.name();
    o.identity = identity;
    return std::make_unique<StoreUpstream>(std::move(inner), std::move(store),
                                           o);
  }
  v1::ExportConfig SparseRandom(const std::string& log, int seed) {
    v1::ExportConfig c =
        CommandExport({"nbdkit", "--filter=log", "sparse-random", "1G",
                       absl::StrCat("seed=", seed), "percent=30",
                       "runlength=65536", absl::StrCat("logfile=", log)});
    c.set_name("snap");
    c.set_immutable(true);
    c.set_content_id("disk-1@t0");
    return c;
  }

  TempDir dir_;
};

TEST_F(StoreUpstreamTest, RestartIsWarmWithOnlyTheVerificationCall) {
  const std::string log1 = dir_.File("log1"), log2 = dir_.File("log2");
  ExtentList cold;
  {
    std::shared_ptr<ExtentStore> store = OpenStore();
    std::unique_ptr<StoreUpstream> up =
        Wrap(SparseRandom(log1, 1), store, "id:disk-1@t0");
    ASSERT_NE(up, nullptr);
    cold = MapAll(*up);
    UpstreamStats st = up->Stats();
    EXPECT_EQ(st.store_contexts["base:allocation"].hits, 0u);
    EXPECT_GT(st.store_contexts["base:allocation"].writes, 0u);
    EXPECT_EQ(static_cast<uint64_t>(LoggedExtentsCalls(log1)),
              st.store_contexts["base:allocation"].misses);
  }
  // "Restart": a new store handle and upstream on the same directory.
  std::shared_ptr<ExtentStore> store = OpenStore();
  std::unique_ptr<StoreUpstream> up =
      Wrap(SparseRandom(log2, 1), store, "id:disk-1@t0");
  ASSERT_NE(up, nullptr);
  ExtentList warm = MapAll(*up);
  EXPECT_EQ(warm, cold);
  UpstreamStats st = up->Stats();
  const UpstreamStats::StoreContext& k = st.store_contexts["base:allocation"];
  EXPECT_EQ(k.misses, 0u);
  EXPECT_EQ(k.verify_calls, 1u);
  EXPECT_GT(k.hits, 0u);
  EXPECT_EQ(LoggedExtentsCalls(log2), 1);  // the reopen check only
  EXPECT_GT(st.store_bytes, 0u);
  EXPECT_EQ(st.store_verify_failures, 0u);
}

TEST_F(StoreUpstreamTest, DifferentContentUnderTheSameIdFailsTheCheck) {
  const std::string log1 = dir_.File("log1"), log2 = dir_.File("log2");
  {
    std::shared_ptr<ExtentStore> store = OpenStore();
    std::unique_ptr<StoreUpstream> up =
        Wrap(SparseRandom(log1, 1), store, "id:disk-1@t0");
    ASSERT_NE(up, nullptr);
    MapAll(*up);
  }
  std::shared_ptr<ExtentStore> store = OpenStore();
  // A mistaken operator: other content under the same content_id.
  v1::ExportConfig other = SparseRandom(log2, 2);
  std::unique_ptr<StoreUpstream> up = Wrap(other, store, "id:disk-1@t0");
  ASSERT_NE(up, nullptr);
  ExtentList got = MapAll(*up);
  UpstreamStats st = up->Stats();
  EXPECT_EQ(st.store_verify_failures, 1u);
  EXPECT_EQ(st.store_contexts["base:allocation"].hits, 0u);
  // What it served is the new upstream's own map, read back directly.
  std::unique_ptr<Upstream> direct = Connect(SparseRandom(dir_.File("l3"), 2));
  ASSERT_NE(direct, nullptr);
  EXPECT_EQ(got, MapAll(*direct));
  // The discarded answers are gone; the new ones were stored.
  st = up->Stats();
  EXPECT_GT(st.store_contexts["base:allocation"].writes, 0u);
}

TEST_F(StoreUpstreamTest, RewrittenImageGetsANewIdentityAndNothingOldIsServed) {
  const std::string path = dir_.File("disk.raw");
  ASSERT_TRUE(testing::MakeImage(path, "raw", 64 << 20).ok());
  ASSERT_TRUE(testing::QemuIo(path, "raw", {"write -P 1 0 8M"}).ok());
  v1::ExportConfig c = ImageExport(path, /*read_only=*/true);
  c.set_name("img");
  c.set_immutable(true);
  std::optional<std::string> id1 = ContentIdentity(c);
  ASSERT_TRUE(id1.has_value());
  ExtentList first;
  {
    std::shared_ptr<ExtentStore> store = OpenStore();
    std::unique_ptr<StoreUpstream> up = Wrap(c, store, *id1);
    ASSERT_NE(up, nullptr);
    first = MapAll(*up);
  }
  // Another image under the same name and path, with a new mtime.
  const std::string next = dir_.File("next.raw");
  ASSERT_TRUE(testing::MakeImage(next, "raw", 64 << 20).ok());
  ASSERT_TRUE(testing::QemuIo(next, "raw", {"write -P 2 32M 16M"}).ok());
  struct timeval later[2] = {{2000000000, 0}, {2000000000, 0}};
  ASSERT_EQ(::utimes(next.c_str(), later), 0);
  ASSERT_EQ(std::rename(next.c_str(), path.c_str()), 0);
  std::optional<std::string> id2 = ContentIdentity(c);
  ASSERT_TRUE(id2.has_value());
  ASSERT_NE(id1, id2);
  std::shared_ptr<ExtentStore> store = OpenStore();
  std::unique_ptr<StoreUpstream> up = Wrap(c, store, *id2);
  ASSERT_NE(up, nullptr);
  EXPECT_EQ(store->IdentityBytes(*id1), 0u);  // discarded at open
  ExtentList second = MapAll(*up);
  absl::StatusOr<ExtentList> truth = testing::QemuImgMap(path, "raw");
  ASSERT_TRUE(truth.ok()) << truth.status();
  EXPECT_EQ(second, MergeAdjacent(*truth));
  EXPECT_NE(second, first);
  UpstreamStats st = up->Stats();
  EXPECT_EQ(st.store_contexts["base:allocation"].hits, 0u);
}

TEST_F(StoreUpstreamTest, WritesAreRefusedAndTheExportIsReadOnly) {
  std::shared_ptr<ExtentStore> store = OpenStore();
  v1::ExportConfig c = CommandExport({"nbdkit", "memory", "16M"});
  c.set_name("m");
  c.set_immutable(true);
  c.set_content_id("m");
  std::unique_ptr<StoreUpstream> up = Wrap(c, store, "id:m");
  ASSERT_NE(up, nullptr);
  char buf[512] = {};
  EXPECT_THAT(up->Pwrite(buf, sizeof buf, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(up->Trim(512, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(up->Zero(512, 0, 0, Soon()),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_TRUE(up->Pread(buf, sizeof buf, 0, Soon()).ok());
  absl::StatusOr<UpstreamInfo> info = up->Info();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->read_only);
}

}  // namespace
}  // namespace blockmeta
