// tests/nbd/shim_large_request_test.cc — the NBD project's
// nbd-tester-client large-request integrity test, as a client that pauses
// mid-payload: it pipelines a READ whose reply is larger than the socket
// buffers, starts a large WRITE, stops half way through its payload and
// waits for the READ reply before it sends the rest. A server that
// finishes replies only between requests holds the READ reply until the
// write timeout (30 s); nbdkit and qemu-nbd deliver it at once. Then every
// byte written and read is checked.
//
// The same client runs against nbdkit directly (the control: the test
// itself must pass there) and through the shim (nbdkit behind the libnbd
// Upstream), on Unix sockets, with simple replies as the tester uses.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/config.pb.h"
#include "gtest/gtest.h"
#include "server/nbd/protocol.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_test_client.h"
#include "tests/testing/shim_rig.h"

namespace blockmeta {
namespace {

using nbd::testing::RawClient;
using nbd::testing::Req;

constexpr uint32_t kMiB = 1 << 20;
// Larger than a Unix socket's buffers on both sides (the shim sets 1 MiB
// SO_SNDBUF): the READ reply cannot be written in one go.
constexpr uint32_t kReadLength = 8 * kMiB;
constexpr uint32_t kWriteLength = 16 * kMiB;
constexpr uint64_t kWriteOffset = 16 * kMiB;
// Far from the alternative (the 30 s write timeout), far above the
// ~0.01 s nbdkit takes.
const absl::Duration kPromptly = absl::Seconds(5);

std::string Pattern(uint32_t length, uint8_t seed) {
  std::string s(length, '\0');
  for (uint32_t i = 0; i < length; ++i) {
    s[i] = static_cast<char>((i / 4096 * 31 + i * 7 + seed) & 0xff);
  }
  return s;
}

// Runs the test on `sock` (export `name`); returns how long the READ reply
// took once the client asked for it, mid-WRITE.
absl::Duration LargeRequestIntegrity(const std::string& sock,
                                     const std::string& name) {
  auto c = RawClient::ConnectUnix(sock, absl::Seconds(40));
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return absl::InfiniteDuration();
  auto hs = (*c)->Handshake(name, /*structured=*/false, {});
  EXPECT_TRUE(hs.ok()) << hs.status();
  if (!hs.ok()) return absl::InfiniteDuration();

  // Known data under the READ.
  const std::string before = Pattern(kReadLength, 1);
  auto w = (*c)->Call(Req(nbd::kCmdWrite, 0, kReadLength, 0, 10), before);
  EXPECT_TRUE(w.ok() && w->error == 0) << w.status();

  // READ, then a WRITE whose payload stops half way.
  const std::string data = Pattern(kWriteLength, 2);
  EXPECT_TRUE((*c)->Send(nbd::testing::RequestBytes(
                             Req(nbd::kCmdRead, 0, kReadLength, 0, 1)))
                  .ok());
  EXPECT_TRUE(
      (*c)->Send(nbd::testing::RequestBytes(
                     Req(nbd::kCmdWrite, kWriteOffset, kWriteLength, 0, 2)) +
                 data.substr(0, kWriteLength / 2))
          .ok());
  // The pause: wait for the READ reply, sending nothing.
  const absl::Time asked = absl::Now();
  auto r = (*c)->ReadReply(kReadLength);
  const absl::Duration took = absl::Now() - asked;
  EXPECT_TRUE(r.ok()) << r.status() << " after " << took;
  if (!r.ok()) return took;
  EXPECT_EQ(r->handle, 1u);
  EXPECT_EQ(r->error, 0u);
  EXPECT_TRUE(r->data == before) << "READ data differs";

  // Finish the WRITE; then read it back.
  EXPECT_TRUE((*c)->Send(data.substr(kWriteLength / 2)).ok());
  auto wr = (*c)->ReadReply();
  EXPECT_TRUE(wr.ok()) << wr.status();
  if (wr.ok()) {
    EXPECT_EQ(wr->handle, 2u);
    EXPECT_EQ(wr->error, 0u);
  }
  auto back = (*c)->Call(Req(nbd::kCmdRead, kWriteOffset, kWriteLength, 0, 3),
                         "", kWriteLength);
  EXPECT_TRUE(back.ok()) << back.status();
  if (back.ok()) {
    EXPECT_EQ(back->error, 0u);
    EXPECT_TRUE(back->data == data) << "written data differs";
  }
  // And the READ range was not disturbed by the interleaving.
  auto again =
      (*c)->Call(Req(nbd::kCmdRead, 0, kReadLength, 0, 4), "", kReadLength);
  EXPECT_TRUE(again.ok() && again->data == before);
  return took;
}

const std::vector<std::string> kNbdkit = {"nbdkit", "-f",     "-U",
                                          "{sock}", "memory", "64M"};

TEST(ShimLargeRequest, ControlNbdkitDeliversThePendingReplyMidPayload) {
  auto p = testing::NbdProcess::Start(kNbdkit);
  ASSERT_TRUE(p.ok()) << p.status();
  const absl::Duration took = LargeRequestIntegrity((*p)->socket_path(), "");
  std::cout << "nbdkit: READ reply mid-WRITE after " << took << "\n";
  EXPECT_LT(took, kPromptly);
}

TEST(ShimLargeRequest, ShimDeliversThePendingReplyMidPayload) {
  auto rig = testing::StartShimRig(kNbdkit, "disk");
  ASSERT_TRUE(rig.ok()) << rig.status();
  const absl::Duration took = LargeRequestIntegrity((*rig)->sock, "disk");
  std::cout << "shim: READ reply mid-WRITE after " << took << "\n";
  EXPECT_LT(took, kPromptly);
}

}  // namespace
}  // namespace blockmeta
