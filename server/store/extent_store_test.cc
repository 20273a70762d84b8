// server/store/extent_store_test.cc — the LevelDB store against a reference
// model (a ground-truth map every stored answer is a slice of), plus
// reopen, identity discard, eviction under max_bytes, corruption set aside,
// orphan cleanup and the disk cost per extent.
#include "server/store/extent_store.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

// A fixed "upstream" map: contiguous extents from 0 to size.
ExtentList TruthMap(std::mt19937_64& rng, uint64_t size, uint64_t mean_run) {
  ExtentList m;
  uint64_t pos = 0;
  while (pos < size) {
    uint64_t len = 512 * (1 + rng() % (2 * mean_run / 512));
    len = std::min(len, size - pos);
    uint32_t flags = static_cast<uint32_t>(rng() % 2 == 0 ? 0 : 3);
    if (!m.empty() && m.back().flags == flags) {
      m.back().length += len;
    } else {
      m.push_back({pos, len, flags});
    }
    pos += len;
  }
  return m;
}

// What an upstream answers from `offset`: the truth's extents over
// [offset, offset + length), the first clipped to start at offset.
ExtentList Answer(const ExtentList& truth, uint64_t offset, uint64_t length) {
  ExtentList out;
  auto it = std::upper_bound(
      truth.begin(), truth.end(), offset,
      [](uint64_t o, const Extent& e) { return o < e.offset; });
  --it;
  uint64_t end = offset + length;
  for (; it != truth.end() && it->offset < end; ++it) {
    Extent e = *it;
    if (e.offset < offset) {
      e.length = e.end() - offset;
      e.offset = offset;
    }
    out.push_back(e);
  }
  return out;
}

// Every byte of `got` has the truth's flags, and `got` is contiguous from
// offset.
void ExpectConsistent(const ExtentList& truth, uint64_t offset,
                      const ExtentList& got) {
  ASSERT_FALSE(got.empty());
  uint64_t cursor = offset;
  for (const Extent& e : got) {
    ASSERT_EQ(e.offset, cursor);
    ASSERT_GT(e.length, 0u);
    for (const Extent& t : Answer(truth, e.offset, e.length)) {
      ASSERT_EQ(t.flags, e.flags) << "at " << t.offset;
    }
    cursor = e.end();
  }
}

class ExtentStoreTest : public ::testing::Test {
 protected:
  std::string Dir(const std::string& name) {
    return absl::StrCat(
        ::testing::TempDir(), "/", name, "-",
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  std::shared_ptr<ExtentStore> Open(const std::string& path,
                                    uint64_t max_bytes = uint64_t{1} << 30) {
    ExtentStoreOptions o;
    o.path = path;
    o.max_bytes = max_bytes;
    o.max_extents_per_record = 64;
    absl::StatusOr<std::shared_ptr<ExtentStore>> s = ExtentStore::Open(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : nullptr;
  }
};

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file(ec)) total += e.file_size(ec);
  }
  return total;
}

TEST_F(ExtentStoreTest, LookupsAgreeWithTheModelAndSurviveReopen) {
  std::mt19937_64 rng(7);
  const uint64_t size = 64 << 20;
  ExtentList truth = TruthMap(rng, size, 8192);
  const std::string path = Dir("db");
  std::map<uint64_t, uint64_t> written;  // window start -> end (aligned)
  const uint64_t window = 1 << 20;
  {
    std::shared_ptr<ExtentStore> s = Open(path);
    s->OpenIdentity("e", "id:a");
    absl::StatusOr<uint32_t> slot = s->Slot("id:a", "base:allocation");
    ASSERT_TRUE(slot.ok());
    for (int i = 0; i < 40; ++i) {
      uint64_t start = (rng() % (size / window)) * window;
      ExtentList a = Answer(truth, start, window);  // may run past window
      ASSERT_TRUE(s->Write(*slot, a).ok());
      written[start] = std::max(written[start], a.back().end());
    }
  }
  // Reopened: every covered offset hits and agrees; uncovered ones miss.
  std::shared_ptr<ExtentStore> s = Open(path);
  s->OpenIdentity("e", "id:a");
  absl::StatusOr<uint32_t> slot = s->Slot("id:a", "base:allocation");
  ASSERT_TRUE(slot.ok());
  for (int i = 0; i < 2000; ++i) {
    uint64_t off = rng() % size;
    uint64_t len = 1 + rng() % (4 * window);
    std::optional<ExtentList> got = s->Lookup(*slot, off, len, 1u << 20);
    auto w = written.upper_bound(off);
    bool covered = w != written.begin() && std::prev(w)->second > off;
    ASSERT_EQ(got.has_value(), covered) << off;
    if (!got) continue;
    ExpectConsistent(truth, off, *got);
    // It stops at a gap or once the request is covered.
    uint64_t end = got->back().end();
    auto next = written.upper_bound(end);
    EXPECT_TRUE(end >= off + len || next == written.begin() ||
                std::prev(next)->second <= end)
        << off;
  }
  // Another context of the same identity shares nothing.
  absl::StatusOr<uint32_t> other = s->Slot("id:a", "qemu:dirty-bitmap:b");
  ASSERT_TRUE(other.ok());
  EXPECT_NE(*other, *slot);
  EXPECT_FALSE(s->Lookup(*other, written.begin()->first, 1, 10).has_value());
}

TEST_F(ExtentStoreTest, OverlappingAnswersStayConsistent) {
  std::mt19937_64 rng(11);
  const uint64_t size = 16 << 20;
  ExtentList truth = TruthMap(rng, size, 4096);
  std::shared_ptr<ExtentStore> s = Open(Dir("db"));
  s->OpenIdentity("e", "id:a");
  uint32_t slot = *s->Slot("id:a", "base:allocation");
  for (int i = 0; i < 200; ++i) {
    uint64_t start = rng() % size / 512 * 512;
    uint64_t len = std::min<uint64_t>(1 + rng() % (2 << 20), size - start);
    ASSERT_TRUE(s->Write(slot, Answer(truth, start, len)).ok());
    uint64_t off = rng() % size;
    std::optional<ExtentList> got = s->Lookup(slot, off, rng() % size + 1, 50);
    if (got) {
      ExpectConsistent(truth, off, *got);
      EXPECT_LE(got->size(), 50u);
    }
    // What was just written is found.
    std::optional<ExtentList> mine = s->Lookup(slot, start, len, 1u << 20);
    ASSERT_TRUE(mine.has_value());
    ExpectConsistent(truth, start, *mine);
  }
}

TEST_F(ExtentStoreTest, MalformedAnswersAreRefused) {
  std::shared_ptr<ExtentStore> s = Open(Dir("db"));
  s->OpenIdentity("e", "id:a");
  uint32_t slot = *s->Slot("id:a", "base:allocation");
  EXPECT_THAT(s->Write(slot, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s->Write(slot, {{0, 512, 0}, {1024, 512, 0}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(s->Write(slot, {{0, 0, 0}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_FALSE(s->Lookup(slot, 0, 1, 1).has_value());
}

TEST_F(ExtentStoreTest, ChangedIdentityAndDiscardForgetEverything) {
  const std::string path = Dir("db");
  {
    std::shared_ptr<ExtentStore> s = Open(path);
    s->OpenIdentity("e", "image:1");
    uint32_t slot = *s->Slot("image:1", "base:allocation");
    ASSERT_TRUE(s->Write(slot, {{0, 4096, 0}}).ok());
    s->CloseIdentity("image:1");
  }
  std::shared_ptr<ExtentStore> s = Open(path);
  EXPECT_GT(s->IdentityBytes("image:1"), 0u);
  // The same name now serves other content: the old answers go.
  s->OpenIdentity("e", "image:2");
  EXPECT_EQ(s->IdentityBytes("image:1"), 0u);
  EXPECT_EQ(s->Stats().bytes, 0u);
  uint32_t slot2 = *s->Slot("image:2", "base:allocation");
  ASSERT_TRUE(s->Write(slot2, {{0, 8192, 3}}).ok());
  s->DiscardIdentity("image:2");
  EXPECT_FALSE(s->Lookup(slot2, 0, 1, 1).has_value());
  // A slot given out before the discard stays dead.
  EXPECT_TRUE(s->Write(slot2, {{0, 8192, 3}}).ok());
  EXPECT_FALSE(s->Lookup(slot2, 0, 1, 1).has_value());
  uint32_t fresh = *s->Slot("image:2", "base:allocation");
  EXPECT_NE(fresh, slot2);
  EXPECT_FALSE(s->Lookup(fresh, 0, 1, 1).has_value());
  s.reset();
  s = Open(path);
  EXPECT_EQ(s->Stats().bytes, 0u);  // the dead slot's write was cleaned up
  EXPECT_EQ(s->Stats().records, 0u);
}

TEST_F(ExtentStoreTest, MaxBytesEvictsOtherIdentitiesLeastRecentFirst) {
  std::shared_ptr<ExtentStore> s = Open(Dir("db"), 4096);
  ExtentList answer;
  for (int i = 0; i < 100; ++i) answer.push_back({i * 512u, 512, i % 2u});
  uint32_t a = 0, b = 0, c = 0;
  s->OpenIdentity("a", "id:a");
  a = *s->Slot("id:a", "base:allocation");
  ASSERT_TRUE(s->Write(a, answer).ok());
  s->CloseIdentity("id:a");
  s->OpenIdentity("b", "id:b");
  b = *s->Slot("id:b", "base:allocation");
  ASSERT_TRUE(s->Write(b, answer).ok());
  const uint64_t one = s->Stats().bytes / 2;
  ASSERT_GT(one, 0u);
  // Room for about 4096 / one identities: the third evicts the oldest.
  ASSERT_LT(3 * one, 4096u + one);
  s->OpenIdentity("c", "id:c");
  c = *s->Slot("id:c", "base:allocation");
  for (int i = 0; i < 20 && s->Stats().evicted_identities == 0; ++i) {
    ExtentList more;
    for (const Extent& e : answer) {
      more.push_back({e.offset + (i + 1) * 51200u, e.length, e.flags});
    }
    (void)s->Write(c, more);
  }
  EXPECT_LE(s->Stats().bytes, 4096u);
  EXPECT_GE(s->Stats().evicted_identities, 1u);
  EXPECT_FALSE(s->Lookup(a, 0, 1, 1).has_value());  // closed, oldest: gone
  // An answer that can never fit is skipped, not stored.
  ExtentList huge;
  for (int i = 0; i < 2000; ++i) huge.push_back({i * 512u, 512, i % 2u});
  EXPECT_THAT(s->Write(c, huge),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_GE(s->Stats().writes_skipped, 1u);
  EXPECT_LE(s->Stats().bytes, 4096u);
}

TEST_F(ExtentStoreTest, CorruptStoreIsSetAsideAndAFreshOneServes) {
  const std::string path = Dir("db");
  {
    std::shared_ptr<ExtentStore> s = Open(path);
    s->OpenIdentity("e", "id:a");
    uint32_t slot = *s->Slot("id:a", "base:allocation");
    for (int i = 0; i < 50; ++i) {
      ASSERT_TRUE(s->Write(slot, {{i * 4096u, 4096, 0}}).ok());
    }
  }
  // Garble every file of the store (log, manifest, tables).
  for (const auto& e : std::filesystem::directory_iterator(path)) {
    if (e.path().filename() == "LOCK") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    f << std::string(64, '\x5a');
  }
  std::shared_ptr<ExtentStore> s = Open(path);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->Stats().set_aside, 1u);
  EXPECT_EQ(s->Stats().bytes, 0u);
  s->OpenIdentity("e", "id:a");
  uint32_t slot = *s->Slot("id:a", "base:allocation");
  EXPECT_FALSE(s->Lookup(slot, 0, 1, 1).has_value());
  ASSERT_TRUE(s->Write(slot, {{0, 4096, 0}}).ok());
  EXPECT_TRUE(s->Lookup(slot, 0, 1, 1).has_value());
  // The corrupt one is kept beside it for a post-mortem.
  int aside = 0;
  for (const auto& e :
       std::filesystem::directory_iterator(::testing::TempDir())) {
    const std::string n = e.path().filename();
    if (n.find("db-CorruptStoreIsSetAside") == 0 &&
        n.find(".corrupt-") != std::string::npos) {
      ++aside;
    }
  }
  EXPECT_EQ(aside, 1);
}

TEST_F(ExtentStoreTest, ACorruptTableWhileRunningTurnsTheStoreOff) {
  const std::string path = Dir("db");
  {
    std::shared_ptr<ExtentStore> s = Open(path);
    s->OpenIdentity("e", "id:a");
    uint32_t slot = *s->Slot("id:a", "base:allocation");
    ExtentList answer;
    for (int i = 0; i < 20000; ++i) answer.push_back({i * 4096u, 4096, i % 2u});
    ASSERT_TRUE(s->Write(slot, answer).ok());
  }
  std::shared_ptr<ExtentStore> s = Open(path);  // the log is now a table
  ASSERT_NE(s, nullptr);
  s->OpenIdentity("e", "id:a");
  uint32_t slot = *s->Slot("id:a", "base:allocation");
  // Garble the middle of every table file under the open store.
  int tables = 0;
  for (const auto& e : std::filesystem::directory_iterator(path)) {
    if (e.path().extension() != ".ldb") continue;
    const std::string file = e.path();
    struct stat st;
    ASSERT_EQ(::stat(file.c_str(), &st), 0);
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(st.st_size / 4);
    f << std::string(st.st_size / 4, '\x5a');
    ++tables;
  }
  ASSERT_GT(tables, 0);
  // Every lookup either misses or is right; the first checksum error turns
  // the store off and renames it aside.
  for (int i = 0; i < 20000; i += 97) {
    std::optional<ExtentList> got = s->Lookup(slot, i * 4096u, 4096, 1);
    if (got) EXPECT_EQ(got->front(), (Extent{i * 4096u, 4096, i % 2u}));
  }
  EXPECT_TRUE(s->Stats().broken);
  EXPECT_EQ(s->Stats().set_aside, 1u);
  EXPECT_FALSE(s->Lookup(slot, 0, 1, 1).has_value());
  EXPECT_THAT(s->Slot("id:a", "base:allocation"),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(s->Write(slot, {{0, 4096, 0}}).ok());  // dead: stores nothing
  // The next start gets a fresh store at the same path.
  s.reset();
  s = Open(path);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->Stats().bytes, 0u);
  EXPECT_FALSE(s->Stats().broken);
}

// Issue 22: at most 16 bytes per extent on disk. Sparse-random-like maps
// (alternating data/hole runs averaging 4 KiB), stored as 4 GiB-style
// answers of many extents, measured after LevelDB wrote its tables.
TEST_F(ExtentStoreTest, DiskCostPerExtentIsAtMost16Bytes) {
  std::mt19937_64 rng(3);
  const uint64_t size = uint64_t{2} << 30;
  ExtentList truth = TruthMap(rng, size, 4096);
  const std::string path = Dir("db");
  {
    ExtentStoreOptions o;
    o.path = path;
    absl::StatusOr<std::shared_ptr<ExtentStore>> s = ExtentStore::Open(o);
    ASSERT_TRUE(s.ok());
    (*s)->OpenIdentity("e", "id:a");
    uint32_t slot = *(*s)->Slot("id:a", "base:allocation");
    const uint64_t window = 256 << 20;
    for (uint64_t off = 0; off < size; off += window) {
      ASSERT_TRUE((*s)->Write(slot, Answer(truth, off, window)).ok());
    }
  }
  // Reopen: LevelDB turns its log into a table; the size is then stable.
  std::shared_ptr<ExtentStore> s = Open(path);
  const uint64_t extents = s->Stats().extents;
  s.reset();
  const double per_extent = static_cast<double>(DirBytes(path)) / extents;
  std::printf("disk cost: %llu extents, %llu bytes on disk, %.2f B/extent\n",
              static_cast<unsigned long long>(extents),
              static_cast<unsigned long long>(DirBytes(path)), per_extent);
  EXPECT_GT(extents, 100000u);
  EXPECT_LE(per_extent, 16.0);
}

}  // namespace
}  // namespace blockmeta
