// tests/testing/nbd_map_test.cc — parsing of the reference tools' JSON and
// the tools themselves against real servers.
#include "tests/testing/nbd_map.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::testing {
namespace {

using ::blockmeta::testing::StatusIs;

using ::testing::ElementsAre;

TEST(ParseTest, NbdinfoMap) {
  absl::StatusOr<ExtentList> m = ParseNbdinfoMapJson(R"([
{ "offset": 0, "length": 32768, "type": 0, "description": "data"},
{ "offset": 32768, "length": 1015808, "type": 3, "description": "hole,zero"}
])");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(*m, ElementsAre(Extent{0, 32768, 0}, Extent{32768, 1015808, 3}));
}

TEST(ParseTest, NbdinfoMapRejectsGapsAndGarbage) {
  EXPECT_THAT(
      ParseNbdinfoMapJson(
          R"([{"offset":0,"length":1,"type":0}, {"offset":2,"length":1,"type":0}])")
          .status(),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseNbdinfoMapJson("{"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseNbdinfoMapJson(R"([{"offset":0,"type":0}])"),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ParseTest, QemuImgMap) {
  absl::StatusOr<ExtentList> m = ParseQemuImgMapJson(R"(
[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}])");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(*m,
              ElementsAre(Extent{0, 1048576, 3}, Extent{1048576, 65536, 0}));
}

TEST(MergeSliceTest, Basics) {
  ExtentList l = {{0, 10, 0}, {10, 5, 0}, {15, 5, 3}};
  EXPECT_THAT(MergeAdjacent(l),
              ElementsAre(Extent{0, 15, 0}, Extent{15, 5, 3}));
  EXPECT_THAT(Slice(l, 12, 5), ElementsAre(Extent{12, 3, 0}, Extent{15, 2, 3}));
}

TEST(NbdinfoTest, DataPluginMapAndInfo) {
  absl::StatusOr<std::unique_ptr<NbdProcess>> p = NbdProcess::Start(
      {"nbdkit", "-U", "{sock}", "-f", "data", "1 @1048576 2"});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<ExtentList> m = NbdinfoMap((*p)->uri());
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_FALSE(m->empty());
  EXPECT_EQ(m->front().offset, 0u);
  EXPECT_EQ(m->back().end(), 1048577u);
  EXPECT_EQ(m->front().flags, 0u);  // the byte at 0 is data
  absl::StatusOr<NbdinfoExport> info = Nbdinfo((*p)->uri());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 1048577u);
  EXPECT_THAT(info->contexts, ElementsAre("base:allocation"));
}

TEST(QemuImgMapTest, MatchesNbdinfoThroughQemuNbd) {
  TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 4 << 20,
                        {"write -P 0xab 1M 64k", "write -z 2M 64k"})
                  .ok());
  absl::StatusOr<ExtentList> local = QemuImgMap(img, "qcow2");
  ASSERT_TRUE(local.ok()) << local.status();
  absl::StatusOr<std::unique_ptr<NbdProcess>> p = NbdProcess::Start(
      {"qemu-nbd", "-t", "-k", "{sock}", "-f", "qcow2", "--read-only", img});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<ExtentList> remote = NbdinfoMap((*p)->uri());
  ASSERT_TRUE(remote.ok()) << remote.status();
  EXPECT_EQ(MergeAdjacent(*local), MergeAdjacent(*remote));
}

TEST(NbdinfoTest, DirtyBitmapContext) {
  TempDir dir;
  const std::string img = dir.File("b.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 4 << 20, {}).ok());
  ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "b1"}).ok());
  ASSERT_TRUE(QemuIo(img, "qcow2", {"write -P 1 512k 64k"}).ok());
  absl::StatusOr<std::unique_ptr<NbdProcess>> p =
      NbdProcess::Start({"qemu-nbd", "-t", "-k", "{sock}", "-f", "qcow2",
                         "--read-only", "-B", "b1", img});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<ExtentList> m =
      NbdinfoMap((*p)->uri(), "qemu:dirty-bitmap:b1");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(
      MergeAdjacent(*m),
      ElementsAre(Extent{0, 512 << 10, 0}, Extent{512 << 10, 64 << 10, 1},
                  Extent{576 << 10, (4 << 20) - (576 << 10), 0}));
  absl::StatusOr<NbdinfoExport> info = Nbdinfo((*p)->uri());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->read_only);
  EXPECT_THAT(info->contexts, ::testing::IsSupersetOf(
                                  {"base:allocation", "qemu:dirty-bitmap:b1"}));
}

}  // namespace
}  // namespace blockmeta::testing
