// server/common/log_test.cc
#include "server/common/log.h"

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

TEST(LogTest, JsonLineEscapesAndTypesFields) {
  std::string line = FormatLogLine(
      LogFormat::kJson, LogLevel::kWarning, "rpc_done",
      {{"request_id", "r-1"}, {"msg", "a \"b\"\n"}, {"n", 42}, {"ok", true}},
      "2026-01-01T00:00:00.000000Z");
  EXPECT_EQ(line,
            "{\"ts\":\"2026-01-01T00:00:00.000000Z\",\"level\":\"warning\","
            "\"event\":\"rpc_done\",\"request_id\":\"r-1\",\"msg\":\"a "
            "\\\"b\\\"\\n\",\"n\":42,\"ok\":true}\n");
}

TEST(LogTest, TextLineQuotesOnlyWhenNeeded) {
  std::string line = FormatLogLine(
      LogFormat::kText, LogLevel::kInfo, "start",
      {{"export", "disk0"}, {"why", "two words"}, {"port", 5}}, "T");
  EXPECT_EQ(line, "T info start export=disk0 why=\"two words\" port=5\n");
}

TEST(LogTest, LongFieldsAreCut) {
  const std::string huge(15 << 20, 'x');
  for (LogFormat f : {LogFormat::kJson, LogFormat::kText}) {
    std::string line = FormatLogLine(f, LogLevel::kWarning, "e",
                                     {{"export", huge}, {"n", 7}}, "T");
    EXPECT_LT(line.size(), 1200u);
    EXPECT_NE(line.find("...(15728640 bytes)"), std::string::npos) << line;
    EXPECT_NE(line.find('7'), std::string::npos);
  }
}

TEST(LogTest, ParseLogFormat) {
  LogFormat f;
  EXPECT_TRUE(ParseLogFormat("text", &f));
  EXPECT_EQ(f, LogFormat::kText);
  EXPECT_TRUE(ParseLogFormat("json", &f));
  EXPECT_EQ(f, LogFormat::kJson);
  EXPECT_FALSE(ParseLogFormat("xml", &f));
}

TEST(LogTest, ParseLogLevel) {
  LogLevel l;
  EXPECT_TRUE(ParseLogLevel("debug", &l));
  EXPECT_EQ(l, LogLevel::kDebug);
  EXPECT_TRUE(ParseLogLevel("error", &l));
  EXPECT_EQ(l, LogLevel::kError);
  EXPECT_FALSE(ParseLogLevel("verbose", &l));
}

TEST(LogTest, RequestIdsAreUnique) {
  EXPECT_NE(NewRequestId(), NewRequestId());
}

}  // namespace
}  // namespace blockmeta
