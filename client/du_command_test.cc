// client/du_command_test.cc — `blockmeta du`'s flags to a GetTotals request
// (contexts, range, cache mode, output; every bad value a usage error) and
// its human and JSON output of a known response.
#include "client/du_command.h"

#include <map>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::optional<std::string> Parse(
    const std::map<std::string, std::string>& flags, v1::GetTotalsRequest* req,
    DuOutput* out) {
  return DuRequestFromFlags("disk", flags, req, out);
}

TEST(DuRequestFromFlags, DefaultsToBaseAllocationOverTheWholeExport) {
  v1::GetTotalsRequest req;
  DuOutput out = DuOutput::kJson;
  EXPECT_EQ(Parse({}, &req, &out), std::nullopt);
  EXPECT_EQ(req.export_name(), "disk");
  EXPECT_THAT(req.contexts(), ElementsAre("base:allocation"));
  EXPECT_EQ(req.offset(), 0u);
  EXPECT_EQ(req.length(), 0u);
  EXPECT_EQ(req.cache_mode(), v1::CACHE_MODE_UNSPECIFIED);
  EXPECT_EQ(out, DuOutput::kHuman);
}

TEST(DuRequestFromFlags, ContextsRangeCacheAndOutput) {
  v1::GetTotalsRequest req;
  DuOutput out;
  EXPECT_EQ(Parse({{"context", "qemu:dirty-bitmap:a,base:allocation,x:y"},
                   {"offset", "1M"},
                   {"length", "512k"},
                   {"cache", "refresh"},
                   {"output", "json"}},
                  &req, &out),
            std::nullopt);
  // base:allocation first, once; the rest in the order given.
  EXPECT_THAT(req.contexts(),
              ElementsAre("base:allocation", "qemu:dirty-bitmap:a", "x:y"));
  EXPECT_EQ(req.offset(), 1u << 20);
  EXPECT_EQ(req.length(), 512u << 10);
  EXPECT_EQ(req.cache_mode(), v1::CACHE_MODE_REFRESH);
  EXPECT_EQ(out, DuOutput::kJson);
  v1::GetTotalsRequest text;
  EXPECT_EQ(Parse({{"output", "text"}, {"cache", "bypass"}}, &text, &out),
            std::nullopt);
  EXPECT_EQ(out, DuOutput::kHuman);
  EXPECT_EQ(text.cache_mode(), v1::CACHE_MODE_BYPASS);
}

TEST(DuRequestFromFlags, BadValuesAreUsageErrors) {
  const std::map<std::string, std::string> bad[] = {
      {{"context", ""}},        {{"context", "a:b,,c:d"}},
      {{"context", "a:b,a:b"}}, {{"offset", "lots"}},
      {{"length", "0"}},        {{"length", "-1"}},
      {{"cache", "sometimes"}}, {{"output", "yaml"}},
  };
  for (const auto& flags : bad) {
    v1::GetTotalsRequest req;
    DuOutput out;
    std::optional<std::string> e = Parse(flags, &req, &out);
    ASSERT_TRUE(e.has_value())
        << flags.begin()->first << "=" << flags.begin()->second;
    EXPECT_THAT(*e, HasSubstr(absl::StrCat("--", flags.begin()->first)));
  }
}

v1::GetTotalsResponse Sample() {
  v1::GetTotalsResponse r;
  r.set_export_name("disk");
  r.set_export_size(64 << 20);
  r.set_offset(0);
  r.set_length(64 << 20);
  r.set_extents(5);
  r.set_cache_outcome(v1::CACHE_OUTCOME_HIT);
  v1::ContextTotals* a = r.add_contexts();
  a->set_context("base:allocation");
  a->set_extents(3);
  a->set_data(16 << 20);
  a->set_hole(48 << 20);
  a->set_zero(50 << 20);
  a->set_nonzero(14 << 20);
  v1::FlagsTotal* f = a->add_by_flags();
  f->set_flags(0);
  f->set_bytes(14 << 20);
  v1::ContextTotals* d = r.add_contexts();
  d->set_context("qemu:dirty-bitmap:b1");
  d->set_extents(2);
  d->set_dirty(4 << 20);
  d->set_clean(60 << 20);
  d->set_dirty_data(3 << 20);
  d->set_dirty_nonzero(2 << 20);
  return r;
}

TEST(PrintDu, Human) {
  std::ostringstream out;
  PrintDu(Sample(), DuOutput::kHuman, out);
  const std::string s = out.str();
  EXPECT_THAT(s, HasSubstr("export disk, range 0-67108864 (64.0 MiB of "
                           "64.0 MiB), 5 extents, cache HIT\n"));
  EXPECT_THAT(s, HasSubstr("base:allocation (3 extents)\n"));
  EXPECT_THAT(s, HasSubstr("  data                   16777216    16.0 MiB   "
                           "25.0%  allocated\n"));
  EXPECT_THAT(s, HasSubstr("  nonzero"));
  EXPECT_THAT(s, HasSubstr("qemu:dirty-bitmap:b1 (2 extents)\n"));
  EXPECT_THAT(s, HasSubstr("  dirty nonzero           2097152     2.0 MiB    "
                           "3.1%  an incremental backup reads these\n"));
  EXPECT_THAT(s, HasSubstr("  clean                  62914560    60.0 MiB   "
                           "93.8%\n"));
}

TEST(PrintDu, HumanWithoutCrossTotals) {
  v1::GetTotalsResponse r = Sample();
  r.mutable_contexts(1)->clear_dirty_data();
  r.mutable_contexts(1)->clear_dirty_nonzero();
  std::ostringstream out;
  PrintDu(r, DuOutput::kHuman, out);
  EXPECT_THAT(out.str(), HasSubstr("  dirty "));
  EXPECT_THAT(out.str(), ::testing::Not(HasSubstr("dirty data")));
}

TEST(PrintDu, Json) {
  std::ostringstream out;
  PrintDu(Sample(), DuOutput::kJson, out);
  EXPECT_EQ(out.str(),
            "{\"export\": \"disk\", \"export_size\": 67108864, \"offset\": 0, "
            "\"length\": 67108864, \"extents\": 5, \"cache_outcome\": "
            "\"HIT\",\n \"contexts\": [\n"
            "  {\"context\": \"base:allocation\", \"extents\": 3, \"data\": "
            "16777216, \"hole\": 50331648, \"zero\": 52428800, \"nonzero\": "
            "14680064, \"by_flags\": [{\"flags\": 0, \"bytes\": 14680064}], "
            "\"by_flags_truncated\": false},\n"
            "  {\"context\": \"qemu:dirty-bitmap:b1\", \"extents\": 2, "
            "\"dirty\": 4194304, \"clean\": 62914560, \"dirty_data\": 3145728, "
            "\"dirty_nonzero\": 2097152, \"by_flags\": [], "
            "\"by_flags_truncated\": false}\n"
            "]}\n");
}

}  // namespace
}  // namespace blockmeta::client
