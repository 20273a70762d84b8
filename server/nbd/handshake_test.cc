// server/nbd/handshake_test.cc — option haggling over crafted byte streams,
// including each bad handshake input the invariants of handshake.h name
// (NBD spec doc/proto.md "Option haggling"; the CVEs cited there).
#include "server/nbd/handshake.h"

#include <sys/socket.h>
#include <unistd.h>

#include <memory>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/nbd/protocol.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/nbd_test_client.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace nbd {
namespace {

using ::blockmeta::testing::StatusIs;

using testing::ClientFlags;
using testing::GoData;
using testing::MetaData;
using testing::Option;
using testing::OptReply;
using testing::ParseOptReplies;

constexpr uint64_t kSize = 1 << 20;

class HandshakeTest : public ::testing::Test {
 protected:
  HandshakeTest()
      : a_(kSize, 65536, /*with_bitmap=*/true), b_(2 * kSize, 65536, false) {
    exports_.push_back({"a", "disk a", a_ref_, false, absl::Seconds(5)});
    exports_.push_back({"b", "", b_ref_, false, absl::Seconds(5)});
  }

  absl::StatusOr<Negotiated> Run(const std::string& input) {
    stream_ = std::make_unique<MemoryStream>(input_ = input);
    return RunHandshake(*stream_, exports_, options_);
  }
  std::vector<OptReply> Replies() { return ParseOptReplies(stream_->output()); }

  FakeUpstream a_, b_;
  const std::shared_ptr<Upstream> a_ref_ = Unowned(&a_), b_ref_ = Unowned(&b_);
  std::vector<ShimExport> exports_;
  HandshakeOptions options_;
  std::string input_;
  std::unique_ptr<MemoryStream> stream_;
};

TEST_F(HandshakeTest, GreetingIsFixedNewstyle) {
  auto n = Run("");
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));
  const std::string& out = stream_->output();
  ASSERT_EQ(out.size(), 18u);
  const auto* p = reinterpret_cast<const uint8_t*>(out.data());
  EXPECT_EQ(GetBe64(p), kNbdMagic);
  EXPECT_EQ(GetBe64(p + 8), kIHaveOpt);
  EXPECT_EQ(GetBe16(p + 16), kFlagFixedNewstyle | kFlagNoZeroes);
}

TEST_F(HandshakeTest, GoWithInfos) {
  auto n =
      Run(ClientFlags() + Option(kOptStructuredReply) +
          Option(kOptGo,
                 GoData("a", {kInfoName, kInfoDescription, kInfoBlockSize})));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->export_entry, &exports_[0]);
  EXPECT_TRUE(n->structured_replies);
  EXPECT_TRUE(n->contexts.empty());
  auto r = Replies();
  ASSERT_EQ(r.size(), 6u);
  EXPECT_EQ(r[0].type, kRepAck);
  EXPECT_EQ(r[1].type, kRepInfo);
  const auto* p = reinterpret_cast<const uint8_t*>(r[1].data.data());
  ASSERT_EQ(r[1].data.size(), 12u);
  EXPECT_EQ(GetBe16(p), kInfoExport);
  EXPECT_EQ(GetBe64(p + 2), kSize);
  EXPECT_EQ(GetBe16(p + 10), n->transmission_flags);
  EXPECT_EQ(r[2].data.substr(2), "a");
  EXPECT_EQ(r[3].data.substr(2), "disk a");
  ASSERT_EQ(r[4].data.size(), 14u);
  p = reinterpret_cast<const uint8_t*>(r[4].data.data());
  EXPECT_EQ(GetBe16(p), kInfoBlockSize);
  EXPECT_EQ(GetBe32(p + 2), 1u);
  EXPECT_EQ(GetBe32(p + 6), 4096u);
  EXPECT_EQ(GetBe32(p + 10), 32u << 20);
  EXPECT_EQ(r[5].opt, kOptGo);
  EXPECT_EQ(r[5].type, kRepAck);
  EXPECT_EQ(stream_->remaining(), 0u);
}

// The payload cap is the configured one, above 32 MiB when the upstream
// advertises no maximum (the Upstream splits data commands), and a
// multiple of the minimum.
TEST_F(HandshakeTest, BlockSizeMaximumIsTheConfiguredPayloadCap) {
  options_.max_payload_bytes = 64u << 20;
  a_.mutable_info().maximum_block_size_advertised = false;
  auto n = Run(ClientFlags() + Option(kOptGo, GoData("a", {kInfoBlockSize})));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->max_payload, 64u << 20);
  auto r = Replies();
  ASSERT_EQ(r.size(), 3u);  // EXPORT, BLOCK_SIZE, ACK
  const auto* p = reinterpret_cast<const uint8_t*>(r[1].data.data());
  ASSERT_EQ(GetBe16(p), kInfoBlockSize);
  EXPECT_EQ(GetBe32(p + 10), 64u << 20);
}

// An advertised upstream maximum clamps the cap (never raises it).
TEST_F(HandshakeTest, BlockSizeMaximumIsClampedToTheUpstreams) {
  options_.max_payload_bytes = 64u << 20;
  a_.mutable_info().maximum_block_size_advertised = true;
  a_.mutable_info().maximum_block_size = 1u << 20;
  auto n = Run(ClientFlags() + Option(kOptGo, GoData("a", {kInfoBlockSize})));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->max_payload, 1u << 20);
  auto r = Replies();
  ASSERT_EQ(r.size(), 3u);
  const auto* p = reinterpret_cast<const uint8_t*>(r[1].data.data());
  EXPECT_EQ(GetBe32(p + 10), 1u << 20);
  // Above the cap the upstream's larger maximum changes nothing.
  options_.max_payload_bytes = 8u << 20;
  a_.mutable_info().maximum_block_size = 0xffffffffu;  // nbdkit blocksize
  n = Run(ClientFlags() + Option(kOptGo, GoData("a", {kInfoBlockSize})));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->max_payload, 8u << 20);
  // A maximum that is no multiple of the minimum is rounded down to one.
  a_.mutable_info().minimum_block_size = 4096;
  a_.mutable_info().maximum_block_size = (1u << 20) + 100;
  n = Run(ClientFlags() + Option(kOptGo, GoData("a", {kInfoBlockSize})));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->max_payload, 1u << 20);
}

TEST_F(HandshakeTest, TransmissionFlags) {
  UpstreamInfo info = *a_.Info();
  uint16_t f = TransmissionFlags(info, false, true);
  EXPECT_EQ(f, kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
                   kFlagSendWriteZeroes | kFlagSendDf | kFlagSendCache);
  // Config read-only: no write-side features, READ_ONLY set.
  f = TransmissionFlags(info, true, false);
  EXPECT_EQ(f, kFlagHasFlags | kFlagReadOnly | kFlagSendFlush | kFlagSendCache);
  info.can_multi_conn = true;
  EXPECT_TRUE(TransmissionFlags(info, false, false) & kFlagCanMultiConn);
}

TEST_F(HandshakeTest, ExportNameWithAndWithoutZeroes) {
  auto n =
      Run(ClientFlags(kClientFlagFixedNewstyle) + Option(kOptExportName, "b"));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->export_entry, &exports_[1]);
  ASSERT_EQ(stream_->output().size(), 18u + 10 + 124);
  const auto* p = reinterpret_cast<const uint8_t*>(stream_->output().data());
  EXPECT_EQ(GetBe64(p + 18), 2 * kSize);
  n = Run(ClientFlags() + Option(kOptExportName, "b"));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(stream_->output().size(), 18u + 10);
}

TEST_F(HandshakeTest, DefaultExportOnlyWhenUnique) {
  auto n = Run(ClientFlags() + Option(kOptGo, GoData("")));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));  // EOF
  EXPECT_EQ(Replies().at(0).type, kRepErrUnknown);
  exports_.pop_back();
  n = Run(ClientFlags() + Option(kOptGo, GoData("")));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->export_entry->name, "a");
}

TEST_F(HandshakeTest, UnknownExport) {
  auto n = Run(ClientFlags() + Option(kOptGo, GoData("nope")) +
               Option(kOptInfo, GoData("zzz")) + Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  auto r = Replies();
  ASSERT_EQ(r.size(), 5u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  EXPECT_EQ(r[1].type, kRepErrUnknown);
  EXPECT_EQ(r[4].type, kRepAck);
  // EXPORT_NAME cannot reply with an error: hard disconnect, nothing sent.
  n = Run(ClientFlags() + Option(kOptExportName, "nope"));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(stream_->output().size(), 18u);
}

TEST_F(HandshakeTest, ExportNameLongerThan4096) {  // CVE-2022-26495
  std::string long_name(4097, 'x');
  auto n = Run(ClientFlags() + Option(kOptGo, GoData(long_name)) +
               Option(kOptInfo, GoData(std::string(4096, 'x'))));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));  // EOF
  auto r = Replies();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_EQ(r[1].type, kRepErrUnknown);  // 4096 is legal, just unknown
  n = Run(ClientFlags() + Option(kOptExportName, long_name));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(stream_->output().size(), 18u);
  n = Run(ClientFlags() + Option(kOptSetMetaContext, MetaData(long_name, {})));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));  // EOF
}

TEST_F(HandshakeTest, HugeOptionLengthIsNeverRead) {  // CVE-2017-15119
  std::string in = ClientFlags();
  AppendBe64(&in, kIHaveOpt);
  AppendBe32(&in, 99);
  AppendBe32(&in, 0xffffffffu);
  auto n = Run(in);
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kInvalidArgument));
  auto r = Replies();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrTooBig);
  // Just over the cap, with the bytes present: still refused.
  n = Run(ClientFlags() +
          Option(kOptGo, std::string(options_.max_option_length + 1, 'a')));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(HandshakeTest, BadMagicAndFlags) {
  std::string in = ClientFlags();
  AppendBe64(&in, 0x1122334455667788ull);
  AppendBe32(&in, kOptGo);
  AppendBe32(&in, 0);
  EXPECT_THAT(Run(in), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Run(ClientFlags(1u << 5) + Option(kOptGo, GoData("a"))),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(HandshakeTest, UnknownAndUnsupportedOptions) {
  auto n = Run(ClientFlags() + Option(99, "junk") + Option(kOptPeekExport) +
               Option(kOptExtendedHeaders) + Option(0) +
               Option(0x7fffffff, "x") + Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  auto r = Replies();
  ASSERT_EQ(r.size(), 8u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(r[i].type, kRepErrUnsup) << i;
  EXPECT_EQ(r[0].opt, 99u);
}

TEST_F(HandshakeTest, StartTlsIsRefused) {
  auto n = Run(ClientFlags() + Option(kOptStartTls) +
               Option(kOptStartTls, "x") + Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  auto r = Replies();
  EXPECT_EQ(r[0].type, kRepErrPolicy);
  EXPECT_EQ(r[1].type, kRepErrInvalid);
}

// STARTTLS over a memory stream: the "TLS" stream is the same stream, so
// the test sees what the server does around the upgrade.
class StartTlsTest : public HandshakeTest {
 protected:
  absl::StatusOr<Negotiated> RunTls(const std::string& input, TlsMode mode,
                                    bool tls_fails = false) {
    options_.tls = mode;
    stream_ = std::make_unique<MemoryStream>(input_ = input);
    StartTlsFn start = [&]() -> absl::StatusOr<ByteStream*> {
      ++upgrades_;
      if (tls_fails) return absl::UnauthenticatedError("bad certificate");
      return stream_.get();
    };
    return RunHandshake(*stream_, exports_, options_, start);
  }
  int upgrades_ = 0;
};

// Nothing negotiated before STARTTLS survives it (nbdkit CVE-2021-3716):
// structured replies and the meta context selection are forgotten.
TEST_F(StartTlsTest, NoStateCarriedAcrossStartTls) {
  auto n = RunTls(
      ClientFlags() + Option(kOptStructuredReply) +
          Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
          Option(kOptStartTls) + Option(kOptGo, GoData("a")),
      TlsMode::kAllow);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(upgrades_, 1);
  EXPECT_TRUE(n->tls);
  EXPECT_FALSE(n->structured_replies);
  EXPECT_TRUE(n->contexts.empty());
  auto r = Replies();
  ASSERT_GE(r.size(), 4u);
  EXPECT_EQ(r[3].opt, kOptStartTls);
  EXPECT_EQ(r[3].type, kRepAck);
}

TEST_F(StartTlsTest, RequireRefusesEveryOptionBeforeTls) {
  auto n =
      RunTls(ClientFlags() + Option(kOptList) + Option(kOptStructuredReply) +
                 Option(kOptInfo, GoData("a")) + Option(kOptGo, GoData("a")) +
                 Option(kOptStartTls) + Option(kOptStartTls) +
                 Option(kOptStructuredReply) + Option(kOptGo, GoData("a")),
             TlsMode::kRequire);
  ASSERT_TRUE(n.ok()) << n.status();
  auto r = Replies();
  ASSERT_GE(r.size(), 6u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r[i].type, kRepErrTlsReqd) << i;
  EXPECT_EQ(r[4].type, kRepAck);         // STARTTLS
  EXPECT_EQ(r[5].type, kRepErrInvalid);  // STARTTLS again: already on
  EXPECT_TRUE(n->tls);
  EXPECT_TRUE(n->structured_replies);  // negotiated after TLS
  // EXPORT_NAME before TLS: hang up, nothing sent.
  n = RunTls(ClientFlags() + Option(kOptExportName, "a"), TlsMode::kRequire);
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kPermissionDenied));
  // ABORT is allowed.
  n = RunTls(ClientFlags() + Option(kOptAbort), TlsMode::kRequire);
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kCancelled));
}

TEST_F(StartTlsTest, FailedTlsHandshakeEndsTheSession) {
  auto n =
      RunTls(ClientFlags() + Option(kOptStartTls) + Option(kOptGo, GoData("a")),
             TlsMode::kRequire, /*tls_fails=*/true);
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_EQ(upgrades_, 1);
}

TEST_F(HandshakeTest, OptionsWithBadLengths) {
  std::string go_short;
  AppendBe32(&go_short, 100);  // name longer than the option
  auto n = Run(ClientFlags() + Option(kOptGo, go_short + "ab") +
               Option(kOptGo, GoData("a") + "z") +  // trailing byte
               Option(kOptInfo, "12") + Option(kOptList, "x") +
               Option(kOptStructuredReply, "x") + Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  auto r = Replies();
  for (int i = 0; i < 5; ++i) EXPECT_EQ(r[i].type, kRepErrInvalid) << i;
  EXPECT_FALSE(n->structured_replies);
}

TEST_F(HandshakeTest, SetMetaContextNeedsStructuredReplies) {
  auto n = Run(ClientFlags() +
               Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
               Option(kOptListMetaContext, MetaData("a", {})) +
               Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  auto r = Replies();
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_EQ(r[1].type, kRepErrInvalid);
  EXPECT_TRUE(n->contexts.empty());
}

TEST_F(HandshakeTest, SetAndListMetaContexts) {
  auto n =
      Run(ClientFlags() + Option(kOptStructuredReply) +
          Option(kOptListMetaContext, MetaData("a", {})) +
          Option(kOptListMetaContext, MetaData("a", {"base:"})) +
          Option(kOptListMetaContext, MetaData("a", {"qemu:dirty-bitmap:"})) +
          Option(kOptSetMetaContext,
                 MetaData("a", {"base:", "nope:x", "base:allocation",
                                "qemu:dirty-bitmap:b1", "base:allocation"})) +
          Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok()) << n.status();
  auto r = Replies();
  ASSERT_EQ(r.size(), 1u + 3 + 2 + 2 + 3 + 3);
  auto ctx = [](const OptReply& x) {
    return std::make_pair(
        GetBe32(reinterpret_cast<const uint8_t*>(x.data.data())),
        x.data.substr(4));
  };
  EXPECT_EQ(ctx(r[1]), std::make_pair(1u, std::string("base:allocation")));
  EXPECT_EQ(ctx(r[2]), std::make_pair(2u, std::string("qemu:dirty-bitmap:b1")));
  EXPECT_EQ(r[3].type, kRepAck);
  EXPECT_EQ(ctx(r[4]).second, "base:allocation");
  EXPECT_EQ(r[5].type, kRepAck);
  EXPECT_EQ(ctx(r[6]).second, "qemu:dirty-bitmap:b1");
  EXPECT_EQ(r[7].type, kRepAck);
  EXPECT_EQ(r[8].type, kRepMetaContext);
  EXPECT_EQ(r[9].type, kRepMetaContext);
  EXPECT_EQ(r[10].type, kRepAck);
  ASSERT_EQ(n->contexts.size(), 2u);
  EXPECT_EQ(n->contexts[0].name, "base:allocation");
  EXPECT_EQ(n->contexts[1].id, 2u);
}

TEST_F(HandshakeTest, WildcardIsNotForSet) {
  auto n = Run(ClientFlags() + Option(kOptStructuredReply) +
               Option(kOptSetMetaContext, MetaData("a", {"base:"})) +
               Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(Replies()[1].type, kRepAck);
  EXPECT_TRUE(n->contexts.empty());
}

TEST_F(HandshakeTest, ContextsAreBoundToTheExportNamedInSet) {
  auto n = Run(ClientFlags() + Option(kOptStructuredReply) +
               Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
               Option(kOptGo, GoData("b")));
  ASSERT_TRUE(n.ok());
  EXPECT_TRUE(n->contexts.empty());
  // b has no bitmap: asking for one selects nothing.
  n = Run(ClientFlags() + Option(kOptStructuredReply) +
          Option(kOptSetMetaContext, MetaData("b", {"qemu:dirty-bitmap:b1"})) +
          Option(kOptGo, GoData("b")));
  ASSERT_TRUE(n.ok());
  EXPECT_TRUE(n->contexts.empty());
}

TEST_F(HandshakeTest, FailedSetClearsTheSelection) {
  auto n = Run(ClientFlags() + Option(kOptStructuredReply) +
               Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
               Option(kOptSetMetaContext, MetaData("a", {"x"}) + "trailing") +
               Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(Replies()[3].type, kRepErrInvalid);
  EXPECT_TRUE(n->contexts.empty());
  n = Run(ClientFlags() + Option(kOptStructuredReply) +
          Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
          Option(kOptSetMetaContext, MetaData("nope", {"base:allocation"})) +
          Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(Replies()[3].type, kRepErrUnknown);
  EXPECT_TRUE(n->contexts.empty());
}

TEST_F(HandshakeTest, InfoBeforeGoAndOtherOrders) {  // CVE-2019-14851 class
  auto n = Run(ClientFlags() + Option(kOptInfo, GoData("b")) +
               Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
               Option(kOptStructuredReply) + Option(kOptInfo, GoData("a")) +
               Option(kOptStructuredReply) +
               Option(kOptSetMetaContext, MetaData("a", {"base:allocation"})) +
               Option(kOptList) + Option(kOptGo, GoData("a")));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->export_entry, &exports_[0]);
  ASSERT_EQ(n->contexts.size(), 1u);
  EXPECT_EQ(a_.block_status_calls() + a_.data_calls() + b_.data_calls(), 0u);
}

TEST_F(HandshakeTest, ListExports) {
  auto n = Run(ClientFlags() + Option(kOptList) + Option(kOptAbort));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kCancelled));
  auto r = Replies();
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].type, kRepServer);
  EXPECT_EQ(r[0].data.substr(4), "a");
  EXPECT_EQ(r[1].data.substr(4), "b");
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_EQ(r[3].opt, kOptAbort);
  EXPECT_EQ(r[3].type, kRepAck);
}

TEST_F(HandshakeTest, UpstreamNotReady) {
  a_.set_ready(false);
  auto n = Run(ClientFlags() + Option(kOptGo, GoData("a")));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));  // EOF
  EXPECT_EQ(Replies().at(0).type, kRepErrUnknown);
  n = Run(ClientFlags() + Option(kOptExportName, "a"));
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(HandshakeTest, TruncatedAtEveryByteOffset) {
  const std::string full =
      ClientFlags() + Option(kOptStructuredReply) + Option(kOptList) +
      Option(kOptSetMetaContext,
             MetaData("a", {"base:allocation", "qemu:dirty-bitmap:b1"})) +
      Option(kOptInfo, GoData("a", {kInfoBlockSize})) +
      Option(kOptGo, GoData("a", {kInfoName}));
  ASSERT_TRUE(Run(full).ok());
  for (size_t i = 0; i < full.size(); ++i) {
    auto n = Run(full.substr(0, i));
    EXPECT_THAT(n, StatusIs(absl::StatusCode::kUnavailable)) << i;
  }
}

TEST_F(HandshakeTest, NoUpstreamWorkDuringHandshake) {  // CVE-2019-14850
  Run(ClientFlags() + Option(kOptStructuredReply) + Option(kOptList) +
      Option(kOptListMetaContext, MetaData("a", {})) +
      Option(kOptInfo, GoData("a")) + Option(kOptGo, GoData("a")))
      .IgnoreError();
  EXPECT_EQ(a_.block_status_calls(), 0u);
  EXPECT_EQ(a_.data_calls(), 0u);
}

TEST(HandshakeTimeout, SilentClientIsDroppedAtTheDeadline) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  auto up = std::make_shared<FakeUpstream>(kSize, 65536, false);
  std::vector<ShimExport> exports = {{"a", "", up, false, absl::Seconds(5)}};
  FdStream stream(sv[0], /*owns=*/true);
  const absl::Time start = absl::Now();
  stream.SetReadDeadline(start + absl::Milliseconds(200));
  auto n = RunHandshake(stream, exports, HandshakeOptions());
  EXPECT_THAT(n, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  close(sv[1]);
}

}  // namespace
}  // namespace nbd
}  // namespace blockmeta
