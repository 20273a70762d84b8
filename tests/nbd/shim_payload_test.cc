// tests/nbd/shim_payload_test.cc — the shim's READ/WRITE payload cap
// (NBD_INFO_BLOCK_SIZE maximum) with real nbdkit upstreams: clamped to the
// maximum an upstream advertises (nbdkit --filter=blocksize-policy), and
// above 32 MiB when configured so for an upstream that advertises none
// (nbdkit pattern, no block size info). Checked with a raw client (the
// advertised maximum, a READ at and above it) and with nbdinfo --json.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_errors.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_test_client.h"
#include "tests/testing/shim_rig.h"

namespace blockmeta {
namespace {

using nbd::testing::RawClient;
using testing::RunCommand;

constexpr uint32_t kMiB = 1u << 20;

class ShimPayloadTest : public ::testing::Test {
 protected:
  // Serves `argv` (an nbdkit command with {sock}) as export "x" through a
  // shim with `max_payload_bytes`.
  void Serve(std::vector<std::string> argv, uint32_t max_payload_bytes) {
    blockmeta::v1::NbdShimConfig shim;
    shim.set_max_payload_bytes(max_payload_bytes);
    auto rig = testing::StartShimRig(std::move(argv), "x", shim);
    ASSERT_TRUE(rig.ok()) << rig.status();
    rig_ = *std::move(rig);
    sock_ = rig_->sock;
  }
  // The NBD_INFO_BLOCK_SIZE maximum the shim advertises, after GO.
  uint32_t AdvertisedMaximum(RawClient* c) {
    auto h = c->Handshake("x", true, {});
    EXPECT_TRUE(h.ok()) << h.status();
    if (!h.ok()) return 0;
    for (const nbd::testing::OptReply& r : h->replies) {
      const auto* p = reinterpret_cast<const uint8_t*>(r.data.data());
      if (r.type == nbd::kRepInfo && r.data.size() == 14 &&
          nbd::GetBe16(p) == nbd::kInfoBlockSize) {
        return nbd::GetBe32(p + 10);
      }
    }
    ADD_FAILURE() << "no NBD_INFO_BLOCK_SIZE";
    return 0;
  }
  absl::StatusOr<RawClient::Reply> Read(RawClient* c, uint64_t offset,
                                        uint32_t length) {
    nbd::Request r;
    r.type = nbd::kCmdRead;
    r.offset = offset;
    r.length = length;
    r.handle = 7;
    return c->Call(r);
  }

  std::unique_ptr<testing::ShimRig> rig_;
  std::string sock_;
};

// The upstream advertises 1 MiB: a 64 MiB setting is clamped to it; a READ
// of 1 MiB works, one of 2 MiB is refused (EOVERFLOW, structured) and the
// session goes on.
TEST_F(ShimPayloadTest, ClampedToTheUpstreamsAdvertisedMaximum) {
  Serve({"nbdkit", "--exit-with-parent", "-U", "{sock}",
         "--filter=blocksize-policy", "memory", "64M", "blocksize-maximum=1M",
         "blocksize-error-policy=error"},
        64 * kMiB);
  auto c = RawClient::ConnectUnix(sock_);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(AdvertisedMaximum(c->get()), 1 * kMiB);
  auto ok = Read(c->get(), 0, 1 * kMiB);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->error, 0u);
  auto big = Read(c->get(), 0, 2 * kMiB);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->error, kNbdEoverflow);
  auto again = Read(c->get(), 1 * kMiB, 4096);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->error, 0u);
  // What a real client sees.
  auto json = RunCommand(
      {"nbdinfo", "--json", absl::StrCat("nbd+unix:///x?socket=", sock_)});
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_TRUE(absl::StrContains(*json, "\"block_size_maximum\": 1048576"))
      << *json;
}

// No advertised maximum (nbdkit pattern sends no NBD_INFO_BLOCK_SIZE): the
// configured 64 MiB holds, and a 48 MiB READ returns the upstream's bytes
// (the pattern plugin: each 8-byte word is its own offset, big-endian).
TEST_F(ShimPayloadTest, AboveTheDefaultWhenTheUpstreamAdvertisesNone) {
  Serve({"nbdkit", "--exit-with-parent", "-U", "{sock}", "pattern", "128M"},
        64 * kMiB);
  auto c = RawClient::ConnectUnix(sock_);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(AdvertisedMaximum(c->get()), 64 * kMiB);
  const uint64_t offset = 8 * kMiB;
  auto r = Read(c->get(), offset, 48 * kMiB);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->error, 0u);
  ASSERT_EQ(r->chunks.size(), 1u);
  const std::string& d = r->chunks[0].data;  // offset (8) + data
  ASSERT_EQ(d.size(), 8 + 48 * kMiB);
  for (uint64_t at :
       {uint64_t{0}, uint64_t{33} * kMiB, uint64_t{48} * kMiB - 8}) {
    EXPECT_EQ(nbd::GetBe64(reinterpret_cast<const uint8_t*>(d.data()) + 8 + at),
              offset + at);
  }
}

}  // namespace
}  // namespace blockmeta
