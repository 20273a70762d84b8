// server/nbd/refusal_test.cc — the refusal handshake against what the
// spec lets a refused client see (doc/proto.md option haggling).
#include "server/nbd/refusal.h"

#include <string>

#include "gtest/gtest.h"
#include "server/nbd/protocol.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta::nbd {
namespace {

using testing::ClientFlags;
using testing::GoData;
using testing::Option;
using testing::ParseOptReplies;

TEST(Refusal, EveryOptionGetsErrShutdownWithTheMessageAbortAnAck) {
  Refusal r("full");
  std::string out = r.Greeting();
  ASSERT_EQ(out.size(), 18u);
  // Byte by byte: the state machine must not depend on how input is cut.
  const std::string in = ClientFlags() + Option(kOptStructuredReply) +
                         Option(kOptGo, GoData("a")) + Option(kOptList) +
                         Option(kOptAbort);
  bool more = true;
  for (size_t i = 0; i < in.size() && more; ++i) {
    more = r.Feed(in.substr(i, 1), &out);
  }
  EXPECT_FALSE(more);  // closes after ABORT
  std::string rest;
  auto replies = ParseOptReplies(out, &rest);
  EXPECT_TRUE(rest.empty());
  ASSERT_EQ(replies.size(), 4u);
  const uint32_t opts[] = {kOptStructuredReply, kOptGo, kOptList};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(replies[i].opt, opts[i]);
    EXPECT_EQ(replies[i].type, kRepErrShutdown);
    EXPECT_EQ(replies[i].data, "full");
  }
  EXPECT_EQ(replies[3].opt, kOptAbort);
  EXPECT_EQ(replies[3].type, kRepAck);
  EXPECT_TRUE(replies[3].data.empty());
}

TEST(Refusal, HangsUpWhereNoErrorCanBeSent) {
  for (const std::string& in :
       {ClientFlags(1u << 7),                           // unknown client flag
        ClientFlags() + Option(kOptExportName, "a"),    // cannot be errored
        ClientFlags() + std::string(16, 'x'),           // bad option magic
        ClientFlags() + Option(kOptGo).substr(0, 12) +  // 1 MiB option
            std::string("\x00\x10\x00\x00", 4)}) {
    Refusal r("full");
    std::string out;
    EXPECT_FALSE(r.Feed(in, &out));
    EXPECT_TRUE(out.empty());
  }
}

TEST(Refusal, BoundedNumberOfOptions) {
  Refusal r("full");
  std::string out = r.Greeting(), in = ClientFlags();
  for (int i = 0; i < Refusal::kMaxOptions + 1; ++i) in += Option(kOptList);
  EXPECT_FALSE(r.Feed(in, &out));
  EXPECT_EQ(ParseOptReplies(out).size(),
            static_cast<size_t>(Refusal::kMaxOptions));
}

TEST(Refusal, SkipsOptionPayloadsAcrossFeeds) {
  Refusal r("full");
  std::string out = r.Greeting();
  const std::string go = Option(kOptGo, std::string(5000, 'n'));
  EXPECT_TRUE(r.Feed(ClientFlags() + go.substr(0, 100), &out));
  EXPECT_EQ(out.size(), 18u);  // the greeting only
  EXPECT_TRUE(r.Feed(go.substr(100), &out));
  auto replies = ParseOptReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kRepErrShutdown);
}

}  // namespace
}  // namespace blockmeta::nbd
