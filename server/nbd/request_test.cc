// server/nbd/request_test.cc — request parsing and validation: every
// malformed transmission request the NBD spec (doc/proto.md
// "Transmission", "Request message") rules out.
#include "server/nbd/request.h"

#include "gtest/gtest.h"
#include "server/upstream/nbd_errors.h"
#include "tests/testing/nbd_request.h"

namespace blockmeta {
namespace nbd {
namespace {

constexpr uint64_t kSize = 1 << 20;

Negotiated MakeNegotiated(bool structured, bool read_only = false,
                          uint32_t min_block = 1) {
  Negotiated n;
  n.info.size = kSize;
  n.info.can_flush = n.info.can_trim = n.info.can_zero = n.info.can_fua = true;
  n.info.can_cache = true;
  n.structured_replies = structured;
  n.transmission_flags = TransmissionFlags(n.info, read_only, structured);
  if (structured) n.contexts.push_back({1, "base:allocation"});
  n.min_block_size = min_block;
  n.max_payload = 1 << 16;
  return n;
}

using testing::Req;
using testing::RequestBytes;

TEST(ParseRequestHeader, RoundTripAndBadMagic) {
  Request r =
      Req(kCmdBlockStatus, 4096, 512, kCmdFlagReqOne, 0x0102030405060708ull);
  std::string wire = RequestBytes(r);
  ASSERT_EQ(wire.size(), kRequestHeaderSize);
  Request got;
  ASSERT_TRUE(
      ParseRequestHeader(reinterpret_cast<const uint8_t*>(wire.data()), &got));
  EXPECT_EQ(got.type, r.type);
  EXPECT_EQ(got.flags, r.flags);
  EXPECT_EQ(got.handle, r.handle);
  EXPECT_EQ(got.offset, r.offset);
  EXPECT_EQ(got.length, r.length);
  wire = RequestBytes(r, "", kRequestMagic ^ 0x01000000u);
  EXPECT_FALSE(
      ParseRequestHeader(reinterpret_cast<const uint8_t*>(wire.data()), &got));
}

TEST(ValidateRequest, ValidRequests) {
  Negotiated n = MakeNegotiated(true);
  for (const Request& r :
       {Req(kCmdRead, 0, 4096), Req(kCmdRead, kSize - 1, 1, kCmdFlagDf),
        Req(kCmdTrim, 0, kSize), Req(kCmdWriteZeroes, 1, 2, kCmdFlagNoHole),
        Req(kCmdFlush, 0, 0), Req(kCmdCache, 0, kSize),
        Req(kCmdBlockStatus, 0, kSize, kCmdFlagReqOne),
        Req(kCmdWrite, 0, 1 << 16, kCmdFlagFua)}) {
    Verdict v = ValidateRequest(r, n);
    EXPECT_EQ(v.error, 0u) << CommandName(r.type) << " " << v.reason;
    EXPECT_FALSE(v.disconnect);
    EXPECT_FALSE(v.discard_payload);
    EXPECT_EQ(v.payload, r.type == kCmdWrite ? r.length : 0u);
  }
}

// doc/proto.md: a server that advertises NBD_FLAG_SEND_FUA must accept
// NBD_CMD_FLAG_FUA on every command; without the advertisement it is EINVAL.
TEST(ValidateRequest, FuaAcceptedOnEveryCommandWhenAdvertised) {
  Negotiated n = MakeNegotiated(true);
  ASSERT_TRUE(n.transmission_flags & kFlagSendFua);
  Negotiated no_fua = n;
  no_fua.transmission_flags &= ~kFlagSendFua;
  for (const Request& r :
       {Req(kCmdRead, 0, 4096, kCmdFlagFua), Req(kCmdFlush, 0, 0, kCmdFlagFua),
        Req(kCmdCache, 0, 4096, kCmdFlagFua),
        Req(kCmdBlockStatus, 0, 4096, kCmdFlagFua | kCmdFlagReqOne),
        Req(kCmdTrim, 0, 4096, kCmdFlagFua),
        Req(kCmdWriteZeroes, 0, 4096, kCmdFlagFua),
        Req(kCmdWrite, 0, 4096, kCmdFlagFua)}) {
    EXPECT_EQ(ValidateRequest(r, n).error, 0u) << CommandName(r.type);
    EXPECT_EQ(ValidateRequest(r, no_fua).error, kNbdEinval)
        << CommandName(r.type);
  }
}

TEST(ValidateRequest, UnknownCommand) {
  Negotiated n = MakeNegotiated(true);
  for (uint16_t t : {8, 9, 100, 0xffff}) {
    Verdict v = ValidateRequest(Req(t, 0, 1), n);
    EXPECT_EQ(v.error, kNbdEinval) << t;
    EXPECT_FALSE(v.disconnect);
  }
}

TEST(ValidateRequest, UnknownOrMisplacedFlags) {
  Negotiated n = MakeNegotiated(true);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 0, 1, 1u << 9), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 0, 1, kCmdFlagReqOne), n).error,
            kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdWrite, 0, 1, kCmdFlagNoHole), n).error,
            kNbdEinval);
  EXPECT_EQ(
      ValidateRequest(Req(kCmdWriteZeroes, 0, 1, kCmdFlagFastZero), n).error,
      kNbdEinval);  // fast zero not advertised
  EXPECT_EQ(ValidateRequest(Req(kCmdBlockStatus, 0, 1, kCmdFlagDf), n).error,
            kNbdEinval);
  Negotiated simple = MakeNegotiated(false);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 0, 1, kCmdFlagDf), simple).error,
            kNbdEinval);  // DF needs structured replies
  // A write with a bad flag still carries its payload: read and drop it.
  Verdict v = ValidateRequest(Req(kCmdWrite, 0, 100, 1u << 12), n);
  EXPECT_EQ(v.error, kNbdEinval);
  EXPECT_TRUE(v.discard_payload);
  EXPECT_EQ(v.payload, 100u);
}

TEST(ValidateRequest, PastTheEndAndOverflow) {
  Negotiated n = MakeNegotiated(true);
  for (uint16_t t : {kCmdRead, kCmdWrite, kCmdTrim, kCmdWriteZeroes, kCmdCache,
                     kCmdBlockStatus}) {
    EXPECT_EQ(ValidateRequest(Req(t, kSize, 1), n).error, kNbdEinval) << t;
    EXPECT_EQ(ValidateRequest(Req(t, kSize - 1, 2), n).error, kNbdEinval) << t;
    EXPECT_EQ(ValidateRequest(Req(t, ~0ull - 10, 100), n).error, kNbdEinval)
        << t;
    Verdict v = ValidateRequest(Req(t, ~0ull, 0xffffffffu), n);
    // A 4 GiB write payload cannot be skipped: the connection is dropped.
    EXPECT_TRUE(t == kCmdWrite ? v.disconnect : v.error == kNbdEinval) << t;
  }
}

TEST(ValidateRequest, ZeroLength) {
  Negotiated n = MakeNegotiated(true);
  for (uint16_t t : {kCmdRead, kCmdWrite, kCmdTrim, kCmdWriteZeroes, kCmdCache,
                     kCmdBlockStatus}) {
    EXPECT_EQ(ValidateRequest(Req(t, 0, 0), n).error, kNbdEinval) << t;
  }
}

TEST(ValidateRequest, Oversize) {
  Negotiated n = MakeNegotiated(true);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 0, (1 << 16) + 1), n).error,
            kNbdEoverflow);
  EXPECT_EQ(
      ValidateRequest(Req(kCmdRead, 0, (1 << 16) + 1), MakeNegotiated(false))
          .error,
      kNbdEinval);
  Verdict v = ValidateRequest(Req(kCmdWrite, 0, (1 << 16) + 1), n);
  EXPECT_EQ(v.error, kNbdEinval);
  EXPECT_TRUE(v.discard_payload);
  EXPECT_FALSE(v.disconnect);
  v = ValidateRequest(Req(kCmdWrite, 0, 0xffffffffu), n);
  EXPECT_TRUE(v.disconnect);  // too much to skip: hang up
  // Trim, zero and block status are not limited by the payload size.
  EXPECT_EQ(ValidateRequest(Req(kCmdTrim, 0, kSize), n).error, 0u);
  EXPECT_EQ(ValidateRequest(Req(kCmdBlockStatus, 0, kSize), n).error, 0u);
}

TEST(ValidateRequest, Unaligned) {
  Negotiated n = MakeNegotiated(true, false, 512);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 1, 512), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 512, 100), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdWrite, 512, 100), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdTrim, 3, 512), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 512, 1024), n).error, 0u);
  // Block status length need not be aligned (clients ask up to the end).
  EXPECT_EQ(ValidateRequest(Req(kCmdBlockStatus, 0, 1000), n).error, 0u);
}

TEST(ValidateRequest, ReadOnlyRefusesWritesWithEperm) {
  Negotiated n = MakeNegotiated(true, /*read_only=*/true);
  Verdict v = ValidateRequest(Req(kCmdWrite, 0, 512), n);
  EXPECT_EQ(v.error, kNbdEperm);
  EXPECT_TRUE(v.discard_payload);
  EXPECT_EQ(ValidateRequest(Req(kCmdTrim, 0, 512), n).error, kNbdEperm);
  EXPECT_EQ(ValidateRequest(Req(kCmdWriteZeroes, 0, 512), n).error, kNbdEperm);
  EXPECT_EQ(ValidateRequest(Req(kCmdRead, 0, 512), n).error, 0u);
}

TEST(ValidateRequest, BlockStatusNeedsAContext) {
  Negotiated n = MakeNegotiated(true);
  n.contexts.clear();
  EXPECT_EQ(ValidateRequest(Req(kCmdBlockStatus, 0, 512), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdBlockStatus, 0, 512), MakeNegotiated(false))
                .error,
            kNbdEinval);
}

TEST(ValidateRequest, FlushAndDisc) {
  Negotiated n = MakeNegotiated(true);
  EXPECT_EQ(ValidateRequest(Req(kCmdFlush, 1, 0), n).error, kNbdEinval);
  EXPECT_EQ(ValidateRequest(Req(kCmdFlush, 0, 1), n).error, kNbdEinval);
  EXPECT_TRUE(ValidateRequest(Req(kCmdDisc, 0, 0), n).disconnect);
  n.transmission_flags &= ~kFlagSendFlush;
  EXPECT_EQ(ValidateRequest(Req(kCmdFlush, 0, 0), n).error, kNbdEinval);
}

TEST(Replies, Encoding) {
  std::string s = SimpleReply(7, kNbdEinval);
  ASSERT_EQ(s.size(), kSimpleReplyHeaderSize);
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  EXPECT_EQ(GetBe32(p), kSimpleReplyMagic);
  EXPECT_EQ(GetBe32(p + 4), kNbdEinval);
  EXPECT_EQ(GetBe64(p + 8), 7u);
  s = ErrorReply(true, 9, kNbdEperm, "nope");
  ASSERT_EQ(s.size(), kStructuredReplyHeaderSize + 6 + 4);
  p = reinterpret_cast<const uint8_t*>(s.data());
  EXPECT_EQ(GetBe32(p), kStructuredReplyMagic);
  EXPECT_EQ(GetBe16(p + 4), kReplyFlagDone);
  EXPECT_EQ(GetBe16(p + 6), kReplyTypeError);
  EXPECT_EQ(GetBe64(p + 8), 9u);
  EXPECT_EQ(GetBe32(p + 16), 10u);
  EXPECT_EQ(GetBe32(p + 20), kNbdEperm);
  EXPECT_EQ(GetBe16(p + 24), 4u);
  EXPECT_EQ(s.substr(26), "nope");
}

}  // namespace
}  // namespace nbd
}  // namespace blockmeta
