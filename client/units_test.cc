// client/units_test.cc — ParseSize, FormatSize, ParseTimeout.
#include "client/units.h"

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::StatusIs;

TEST(ParseSize, PlainAndSuffixes) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("512k"), 512u << 10);
  EXPECT_EQ(*ParseSize("512K"), 512u << 10);
  EXPECT_EQ(*ParseSize("512KiB"), 512u << 10);
  EXPECT_EQ(*ParseSize("512KB"), 512u << 10);
  EXPECT_EQ(*ParseSize("1M"), 1u << 20);
  EXPECT_EQ(*ParseSize("1G"), 1ull << 30);
  EXPECT_EQ(*ParseSize("1.5G"), 3ull << 29);
  EXPECT_EQ(*ParseSize("2T"), 2ull << 40);
  EXPECT_EQ(*ParseSize("1P"), 1ull << 50);
  EXPECT_EQ(*ParseSize("15E"), 15ull << 60);
  EXPECT_EQ(*ParseSize("100B"), 100u);
  EXPECT_EQ(*ParseSize(" 8k "), 8192u);
  EXPECT_EQ(*ParseSize("18446744073709551615"), UINT64_MAX);
}

TEST(ParseSize, Rejects) {
  for (const char* bad :
       {"", "k", "-1", "1x", "1.5", "1.", ".5k", "1KX", "16E",
        "18446744073709551616", "1 G", "0x10", "1.0000001k", "abc"}) {
    absl::StatusOr<uint64_t> v = ParseSize(bad);
    EXPECT_THAT(v, StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
  }
  EXPECT_NE(ParseSize("1x").status().message().find("invalid size \"1x\""),
            absl::string_view::npos);
}

TEST(FormatSize, Units) {
  EXPECT_EQ(FormatSize(0), "0 B");
  EXPECT_EQ(FormatSize(512), "512 B");
  EXPECT_EQ(FormatSize(1023), "1023 B");
  EXPECT_EQ(FormatSize(1024), "1.0 KiB");
  EXPECT_EQ(FormatSize(1536), "1.5 KiB");
  EXPECT_EQ(FormatSize(3ull << 29), "1.5 GiB");
  EXPECT_EQ(FormatSize(1048575), "1.0 MiB");
  EXPECT_EQ(FormatSize(64ull << 20), "64.0 MiB");
  EXPECT_EQ(FormatSize(UINT64_MAX), "16.0 EiB");
}

TEST(ParseTimeout, Forms) {
  EXPECT_EQ(*ParseTimeout("30s"), absl::Seconds(30));
  EXPECT_EQ(*ParseTimeout("500ms"), absl::Milliseconds(500));
  EXPECT_EQ(*ParseTimeout("1m30s"), absl::Seconds(90));
  EXPECT_EQ(*ParseTimeout("2"), absl::Seconds(2));
  EXPECT_EQ(*ParseTimeout("0.5"), absl::Milliseconds(500));
  for (const char* bad :
       {"", "0", "0s", "-1s", "-2", "soon", "inf", "5 parsecs"}) {
    EXPECT_THAT(ParseTimeout(bad), StatusIs(absl::StatusCode::kInvalidArgument))
        << bad;
  }
}

}  // namespace
}  // namespace blockmeta::client
