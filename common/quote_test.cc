// common/quote_test.cc — QuoteBounded: short strings intact, long
// ones cut with their size, escapes, and a bound on the output whatever the
// input (randomized).
#include "common/quote.h"

#include <random>
#include <string>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

TEST(QuoteBounded, ShortStringsAreQuotedWhole) {
  EXPECT_EQ(QuoteBounded("disk0"), "\"disk0\"");
  EXPECT_EQ(QuoteBounded(""), "\"\"");
  std::string exact(kMaxQuotedBytes, 'n');
  EXPECT_EQ(QuoteBounded(exact), "\"" + exact + "\"");
}

TEST(QuoteBounded, LongStringsShowAPrefixAndTheirSize) {
  std::string mib(1 << 20, 'a');
  EXPECT_EQ(QuoteBounded(mib),
            "\"" + std::string(kMaxQuotedBytes, 'a') + "\"... (1048576 bytes)");
  EXPECT_EQ(QuoteBounded("abcdef", 3), "\"abc\"... (6 bytes)");
}

TEST(QuoteBounded, EscapesQuotesAndControlBytes) {
  EXPECT_EQ(QuoteBounded("a\"b\nc\x01"), "\"a\\\"b\\nc\\x01\"");
}

TEST(QuoteBounded, OutputIsBoundedWhateverTheInput) {
  std::mt19937 rng(42);
  for (int i = 0; i < 2000; ++i) {
    std::string s(rng() % 4096, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    std::string q = QuoteBounded(s);
    EXPECT_LE(q.size(), 4 * kMaxQuotedBytes + 40) << i;
    EXPECT_EQ(q.front(), '"');
  }
}

}  // namespace
}  // namespace blockmeta
