// client/extent_format_test.cc — each output format on fixed extents. The
// qemu-json and nbdinfo expectations are real qemu-img 7.2 / nbdinfo 1.14
// output captured over nbdkit exports with the same extents (the
// differential tests in tests/client compare against the live tools).
#include "client/extent_format.h"

#include <sstream>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::StatusIs;

using blockmeta::v1::Extent;

Extent E(uint64_t offset, uint64_t length, uint32_t flags) {
  Extent e;
  e.set_offset(offset);
  e.set_length(length);
  e.set_nbd_flags(flags);
  return e;
}

std::string Render(OutputFormat f, const std::string& context,
                   const std::vector<Extent>& extents, uint64_t size,
                   bool totals = false, bool dirty_only = false) {
  std::ostringstream out;
  WriterOptions o;
  o.format = f;
  o.totals = totals;
  o.dirty_only = dirty_only;
  auto w = MakeExtentWriter(o, &out);
  EXPECT_TRUE(w.ok()) << w.status();
  MapHeader h;
  h.export_name = "disk";
  h.context = context;
  h.offset = extents.empty() ? 0 : extents.front().offset();
  h.end =
      extents.empty() ? 0 : extents.back().offset() + extents.back().length();
  h.export_size = size;
  (*w)->Begin(h);
  for (const Extent& e : extents) (*w)->Add(e);
  (*w)->End();
  return out.str();
}

// nbdkit sh plugin: "0 512K hole; 512K 512K zero; 1M 1M; 2M 1M hole,zero;
// 3M 512K hole; 3584K 512K", size 4 MiB; split in halves to check merging.
std::vector<Extent> Mixed() {
  return {E(0, 262144, 1),        E(262144, 262144, 1),  E(524288, 524288, 2),
          E(1048576, 1048576, 0), E(2097152, 524288, 3), E(2621440, 524288, 3),
          E(3145728, 524288, 1),  E(3670016, 524288, 0)};
}

TEST(ExtentFormat, QemuJsonMatchesQemuImg) {
  EXPECT_EQ(
      Render(OutputFormat::kQemuJson, "base:allocation", Mixed(), 4194304),
      "[{ \"start\": 0, \"length\": 524288, \"depth\": 0, \"present\": false, "
      "\"zero\": false, \"data\": false},\n"
      "{ \"start\": 524288, \"length\": 524288, \"depth\": 0, \"present\": "
      "true, \"zero\": true, \"data\": true, \"offset\": 524288},\n"
      "{ \"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": "
      "true, \"zero\": false, \"data\": true, \"offset\": 1048576},\n"
      "{ \"start\": 2097152, \"length\": 1048576, \"depth\": 0, \"present\": "
      "true, \"zero\": true, \"data\": false, \"offset\": 2097152},\n"
      "{ \"start\": 3145728, \"length\": 524288, \"depth\": 0, \"present\": "
      "false, \"zero\": false, \"data\": false},\n"
      "{ \"start\": 3670016, \"length\": 524288, \"depth\": 0, \"present\": "
      "true, \"zero\": false, \"data\": true, \"offset\": 3670016}]\n");
}

TEST(ExtentFormat, QemuJsonOddSizeTail) {
  // qemu rounds the disk up to 512 bytes and reports the tail as zero.
  EXPECT_EQ(Render(OutputFormat::kQemuJson, "base:allocation",
                   {E(0, 4096, 3), E(4096, 995904, 0)}, 1000000),
            "[{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": "
            "true, \"zero\": true, \"data\": false, \"offset\": 0},\n"
            "{ \"start\": 4096, \"length\": 995904, \"depth\": 0, "
            "\"present\": true, \"zero\": false, \"data\": true, \"offset\": "
            "4096},\n"
            "{ \"start\": 1000000, \"length\": 448, \"depth\": 0, "
            "\"present\": true, \"zero\": true, \"data\": false}]\n");
}

TEST(ExtentFormat, NbdinfoMatchesNbdinfo) {
  EXPECT_EQ(Render(OutputFormat::kNbdinfo, "base:allocation", Mixed(), 4194304),
            "         0      524288    1  hole\n"
            "    524288      524288    2  zero\n"
            "   1048576     1048576    0  data\n"
            "   2097152     1048576    3  hole,zero\n"
            "   3145728      524288    1  hole\n"
            "   3670016      524288    0  data\n");
}

TEST(ExtentFormat, NbdinfoDirtyBitmapAndTotals) {
  std::vector<Extent> bm = {E(0, 20971520, 0), E(20971520, 1048576, 1),
                            E(22020096, 12582912, 0), E(34603008, 65536, 1),
                            E(34668544, 32440320, 0)};
  EXPECT_EQ(
      Render(OutputFormat::kNbdinfo, "qemu:dirty-bitmap:b1", bm, 67108864),
      "         0    20971520    0  clean\n"
      "  20971520     1048576    1  dirty\n"
      "  22020096    12582912    0  clean\n"
      "  34603008       65536    1  dirty\n"
      "  34668544    32440320    0  clean\n");
  EXPECT_EQ(Render(OutputFormat::kNbdinfo, "qemu:dirty-bitmap:b1", bm, 67108864,
                   /*totals=*/true),
            "  65994752  98.3%   0 clean\n"
            "   1114112   1.7%   1 dirty\n");
}

TEST(ExtentFormat, BooleansFillTheType) {
  Extent e;
  e.set_offset(0);
  e.set_length(512);
  e.set_hole(true);
  e.set_zero(true);
  EXPECT_EQ(ExtentType("base:allocation", e), 3u);
  EXPECT_EQ(ExtentType("", e), 3u);
  Extent d;
  d.set_dirty(true);
  EXPECT_EQ(ExtentType("qemu:dirty-bitmap:x", d), 1u);
  EXPECT_EQ(TypeDescription("qemu:allocation-depth", 2), "backing depth 2");
  EXPECT_EQ(TypeDescription("base:allocation", 7), "");
  EXPECT_EQ(TypeDescription("x:y", 0), "");
}

TEST(ExtentFormat, JsonSchema) {
  EXPECT_EQ(Render(OutputFormat::kJson, "base:allocation",
                   {E(0, 512, 0), E(512, 512, 0), E(1024, 1024, 3)}, 2048),
            "{\"export\": \"disk\", \"context\": \"base:allocation\", "
            "\"offset\": 0, \"end\": 2048, \"export_size\": 2048, "
            "\"extents\": [\n"
            "{\"offset\": 0, \"length\": 1024, \"type\": 0, \"description\": "
            "\"data\", \"hole\": false, \"zero\": false, \"dirty\": false},\n"
            "{\"offset\": 1024, \"length\": 1024, \"type\": 3, "
            "\"description\": \"hole,zero\", \"hole\": true, \"zero\": true, "
            "\"dirty\": false}\n"
            "]}\n");
  EXPECT_EQ(Render(OutputFormat::kJson, "base:allocation",
                   {E(0, 512, 0), E(512, 1536, 3)}, 2048, /*totals=*/true),
            "{\"export\": \"disk\", \"context\": \"base:allocation\", "
            "\"offset\": 0, \"end\": 2048, \"export_size\": 2048, "
            "\"totals\": [\n"
            "{\"type\": 0, \"description\": \"data\", \"bytes\": 512, "
            "\"percent\": 25.0},\n"
            "{\"type\": 3, \"description\": \"hole,zero\", \"bytes\": 1536, "
            "\"percent\": 75.0}\n"
            "]}\n");
}

TEST(ExtentFormat, Csv) {
  EXPECT_EQ(Render(OutputFormat::kCsv, "base:allocation",
                   {E(0, 512, 0), E(512, 1536, 3)}, 2048),
            "offset,length,type,description\n"
            "0,512,0,data\n"
            "512,1536,3,\"hole,zero\"\n");
  EXPECT_EQ(Render(OutputFormat::kCsv, "base:allocation",
                   {E(0, 512, 0), E(512, 1536, 3)}, 2048, true),
            "type,description,bytes,percent\n"
            "0,data,512,25.0\n"
            "3,\"hole,zero\",1536,75.0\n");
}

TEST(ExtentFormat, Human) {
  EXPECT_EQ(Render(OutputFormat::kHuman, "base:allocation",
                   {E(0, 1048576, 0), E(1048576, 3ull << 29, 3)},
                   1048576 + (3ull << 29)),
            "export disk, context base:allocation, range 0-1611661312 (1.5 "
            "GiB)\n"
            "     START         END      LENGTH  TYPE\n"
            "         0     1048576     1.0 MiB  data\n"
            "   1048576  1611661312     1.5 GiB  hole,zero\n"
            "total 1.5 GiB: data 1.0 MiB (0.1%), hole,zero 1.5 GiB (99.9%)\n");
  EXPECT_EQ(Render(OutputFormat::kHuman, "qemu:dirty-bitmap:b",
                   {E(0, 1024, 0), E(1024, 1024, 1), E(2048, 2048, 0)}, 4096,
                   false, /*dirty_only=*/true),
            "export disk, context qemu:dirty-bitmap:b, range 0-4096 (4.0 "
            "KiB)\n"
            "START    END      LENGTH  TYPE\n"
            " 1024   2048     1.0 KiB  dirty\n"
            "1 dirty range, 1.0 KiB of 4.0 KiB (25.0%) changed\n");
}

TEST(ExtentFormat, RejectsQemuJsonTotals) {
  std::ostringstream out;
  WriterOptions o;
  o.format = OutputFormat::kQemuJson;
  o.totals = true;
  EXPECT_THAT(MakeExtentWriter(o, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseOutputFormat("yaml"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(*ParseOutputFormat("nbdinfo"), OutputFormat::kNbdinfo);
}

TEST(ExtentFormat, JsonQuote) {
  EXPECT_EQ(JsonQuote("a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\u0001\"");
}

}  // namespace
}  // namespace blockmeta::client
