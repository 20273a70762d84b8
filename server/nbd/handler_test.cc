// server/nbd/handler_test.cc — request handling against the real
// ExtentCache and an in-memory upstream: block status from the cache,
// REQ_ONE, one chunk per context, invalidation on write, error replies.
#include "server/nbd/handler.h"

#include <random>
#include <utility>

#include "gtest/gtest.h"
#include "server/nbd/stream.h"
#include "server/upstream/nbd_errors.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/nbd_request.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta {
namespace nbd {
namespace {

constexpr uint64_t kSize = 1 << 20;
constexpr uint32_t kBlock = 64 << 10;

class HandlerTest : public ::testing::Test {
 protected:
  HandlerTest() : up_(kSize, kBlock, true), cache_(ExtentCache::Options()) {
    export_ = {"a", "", up_ref_, false, absl::Seconds(5)};
    n_.export_entry = &export_;
    n_.info = *up_.Info();
    n_.structured_replies = true;
    n_.transmission_flags = TransmissionFlags(n_.info, false, true);
    n_.contexts = {{1, "base:allocation"}, {2, "qemu:dirty-bitmap:b1"}};
    up_.Fill(kBlock, kBlock, 'x');  // block 1 is data
  }

  // Runs a request and decodes its reply bytes.
  testing::RawClient::Reply Do(const Request& r, std::string payload = "") {
    RequestHandler h(n_, &cache_);
    std::string bytes = h.Handle(r, std::move(payload));
    // Decode with the same parser the socket tests use.
    return Decode(bytes,
                  r.type == kCmdRead && !n_.structured_replies ? r.length : 0);
  }
  static testing::RawClient::Reply Decode(const std::string& bytes,
                                          uint32_t simple_len) {
    testing::RawClient::Reply reply;
    const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
    size_t pos = 0;
    while (pos < bytes.size()) {
      if (GetBe32(p + pos) == kSimpleReplyMagic) {
        reply.error = GetBe32(p + pos + 4);
        reply.handle = GetBe64(p + pos + 8);
        reply.data = bytes.substr(pos + 16, simple_len);
        EXPECT_EQ(bytes.size(), pos + 16 + (reply.error ? 0 : simple_len));
        return reply;
      }
      EXPECT_EQ(GetBe32(p + pos), kStructuredReplyMagic);
      testing::RawClient::Chunk c{GetBe16(p + pos + 4), GetBe16(p + pos + 6),
                                  ""};
      uint32_t len = GetBe32(p + pos + 16);
      c.data = bytes.substr(pos + 20, len);
      if ((c.type & 0x8000) && reply.error == 0) {
        reply.error = GetBe32(reinterpret_cast<const uint8_t*>(c.data.data()));
      }
      pos += 20 + len;
      EXPECT_EQ(pos == bytes.size(), (c.flags & kReplyFlagDone) != 0);
      reply.chunks.push_back(std::move(c));
    }
    return reply;
  }
  static Request Req(uint16_t type, uint64_t offset, uint32_t length,
                     uint16_t flags = 0) {
    return testing::Req(type, offset, length, flags, /*handle=*/42);
  }

  FakeUpstream up_;
  const std::shared_ptr<Upstream> up_ref_ = Unowned(&up_);
  ExtentCache cache_;
  ShimExport export_;
  Negotiated n_;
};

TEST_F(HandlerTest, BlockStatusOneChunkPerContext) {
  auto r = Do(Req(kCmdBlockStatus, 0, kSize));
  ASSERT_EQ(r.error, 0u);
  ASSERT_EQ(r.chunks.size(), 2u);
  testing::Descriptors base = testing::DecodeBlockStatus(r.chunks[0].data);
  testing::Descriptors dirty = testing::DecodeBlockStatus(r.chunks[1].data);
  EXPECT_EQ(base.context_id, 1u);
  EXPECT_EQ(dirty.context_id, 2u);
  using P = std::pair<uint32_t, uint32_t>;
  EXPECT_EQ(
      base.extents,
      (std::vector<P>{{kBlock, 3}, {kBlock, 0}, {kSize - 2 * kBlock, 3}}));
  EXPECT_EQ(dirty.extents, (std::vector<P>{{kSize, 0}}));
  EXPECT_EQ(r.chunks[0].flags, 0);
  EXPECT_EQ(r.chunks[1].flags, kReplyFlagDone);
  // Served from the cache the second time.
  const uint64_t calls = up_.block_status_calls();
  r = Do(Req(kCmdBlockStatus, 100, 5000));
  EXPECT_EQ(up_.block_status_calls(), calls);
  base = testing::DecodeBlockStatus(r.chunks[0].data);
  EXPECT_EQ(base.extents, (std::vector<P>{{5000, 3}}));  // clipped
}

TEST_F(HandlerTest, ReqOneGivesExactlyOneDescriptorWithinTheRequest) {
  for (uint64_t off :
       {uint64_t{0}, uint64_t{1000}, uint64_t{kBlock}, kSize - 512}) {
    auto r = Do(Req(kCmdBlockStatus, off, static_cast<uint32_t>(kSize - off),
                    kCmdFlagReqOne));
    ASSERT_EQ(r.chunks.size(), 2u);
    for (const auto& c : r.chunks) {
      testing::Descriptors d = testing::DecodeBlockStatus(c.data);
      ASSERT_EQ(d.extents.size(), 1u) << off;
      EXPECT_LE(d.extents[0].first, kSize - off);
      EXPECT_GT(d.extents[0].first, 0u);
    }
  }
  auto r = Do(Req(kCmdBlockStatus, 10, 20, kCmdFlagReqOne));
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[0].data).extents[0].first, 20u);
}

TEST_F(HandlerTest, WritesInvalidateEveryContextBeforeTheReply) {
  Do(Req(kCmdBlockStatus, 0, kSize));
  std::string payload(4096, 'z');
  auto w = Do(Req(kCmdWrite, 3 * kBlock, 4096), payload);
  ASSERT_EQ(w.error, 0u);
  auto r = Do(Req(kCmdBlockStatus, 3 * kBlock, 4096));
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[0].data).extents[0].second, 0u);
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[1].data).extents[0].second, 1u);
  // Trim and zero invalidate too.
  ASSERT_EQ(Do(Req(kCmdTrim, 3 * kBlock, kBlock)).error, 0u);
  r = Do(Req(kCmdBlockStatus, 3 * kBlock, 4096));
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[0].data).extents[0].second, 3u);
  ASSERT_EQ(Do(Req(kCmdWriteZeroes, 3 * kBlock, kBlock)).error, 0u);
  r = Do(Req(kCmdBlockStatus, 3 * kBlock, 4096));
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[0].data).extents[0].second, 0u);
}

// Randomized against a reference: the rounded range covers the write, starts
// and ends on the granularity (or the export end), and is the smallest such.
TEST(RoundOutWrite, CoversTheWriteOnGranularityBoundaries) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 100000; ++i) {
    const uint64_t g = uint64_t{1} << (rng() % 22);
    const uint64_t size = 1 + rng() % (64u << 20);
    const uint64_t off = rng() % size;
    const uint64_t len = 1 + rng() % (size - off);
    auto [s, l] = RoundOutWrite(off, len, g, size);
    ASSERT_LE(s, off);
    ASSERT_GE(s + l, off + len);
    ASSERT_LE(s + l, size);
    ASSERT_EQ(s % g, 0u);
    ASSERT_LT(off - s, g);
    ASSERT_TRUE((s + l) % g == 0 || s + l == size);
    ASSERT_LT(s + l - (off + len), g);
  }
  EXPECT_EQ(RoundOutWrite(4608, 512, 1, 1 << 20),
            (std::pair<uint64_t, uint64_t>{4608, 512}));
  EXPECT_EQ(RoundOutWrite(4608, 512, 65536, 1 << 20),
            (std::pair<uint64_t, uint64_t>{0, 65536}));
  EXPECT_EQ(RoundOutWrite(1000000, 48576, 65536, 1 << 20),
            (std::pair<uint64_t, uint64_t>{983040, 65536}));
}

// A 512-byte write forgets the whole granule around it in every context:
// the next BLOCK_STATUS of a neighbouring byte goes to the upstream again.
TEST_F(HandlerTest, SubBlockWritesForgetTheWholeGranule) {
  export_.invalidate_granularity = 2 * kBlock;
  // Block 6 dirty: both contexts' answers then change flags on block
  // boundaries, so each key's learned bound is one block (granule.h).
  ASSERT_EQ(Do(Req(kCmdWrite, 6 * kBlock, 512), std::string(512, 'q')).error,
            0u);
  Do(Req(kCmdBlockStatus, 0, kSize));
  const uint64_t calls = up_.block_status_calls();
  ASSERT_EQ(
      Do(Req(kCmdWrite, 2 * kBlock + 4608, 512), std::string(512, 'q')).error,
      0u);
  Do(Req(kCmdBlockStatus, 4 * kBlock, 4096));  // the next granule: cached
  EXPECT_EQ(up_.block_status_calls(), calls);
  Do(Req(kCmdBlockStatus, 2 * kBlock, 512));  // before the write: forgotten
  EXPECT_EQ(up_.block_status_calls(), calls + 2);   // both contexts
  Do(Req(kCmdBlockStatus, 4 * kBlock - 512, 512));  // same granule: refetched
  EXPECT_EQ(up_.block_status_calls(), calls + 2);
}

// A context whose answers never changed flags (a clean bitmap) has no
// learned bound: a write forgets it whole, whatever its granularity; the
// other context keeps what lies outside the rounded write.
TEST_F(HandlerTest, WritesForgetAContextOfUnknownGranularityWhole) {
  export_.invalidate_granularity = kBlock;
  Do(Req(kCmdBlockStatus, 0, kSize));
  const uint64_t calls = up_.block_status_calls();
  ASSERT_EQ(
      Do(Req(kCmdWrite, 2 * kBlock + 512, 512), std::string(512, 'q')).error,
      0u);
  Do(Req(kCmdBlockStatus, 8 * kBlock, 4096));
  EXPECT_EQ(up_.block_status_calls(), calls + 1);  // the bitmap only
  auto r = Do(Req(kCmdBlockStatus, 0, kSize));
  ASSERT_EQ(r.chunks.size(), 2u);
  EXPECT_EQ(up_.block_status_calls(), calls + 3);  // the write's block, both
}

TEST_F(HandlerTest, ReadStructuredAndSimple) {
  auto r = Do(Req(kCmdRead, kBlock - 2, 4));
  ASSERT_EQ(r.chunks.size(), 1u);
  EXPECT_EQ(r.chunks[0].type, kReplyTypeOffsetData);
  EXPECT_EQ(GetBe64(reinterpret_cast<const uint8_t*>(r.chunks[0].data.data())),
            kBlock - 2);
  EXPECT_EQ(r.chunks[0].data.substr(8), std::string("\0\0xx", 4));
  n_.structured_replies = false;
  r = Do(Req(kCmdRead, kBlock, 3));
  EXPECT_EQ(r.error, 0u);
  EXPECT_EQ(r.data, "xxx");
}

TEST_F(HandlerTest, UpstreamErrorsBecomeNbdErrors) {
  up_.mutable_info().read_only = true;  // the upstream refuses writes
  auto w = Do(Req(kCmdWrite, 0, 1), "a");
  EXPECT_EQ(w.error, kNbdEperm);
  n_.structured_replies = false;
  w = Do(Req(kCmdWrite, 0, 1), "a");
  EXPECT_EQ(w.error, kNbdEperm);
  up_.set_ready(false);
  n_.structured_replies = true;
  auto r = Do(Req(kCmdBlockStatus, 0, kSize));
  EXPECT_EQ(r.error, kNbdEio);
}

TEST_F(HandlerTest, MissingBaseAllocationUpstreamIsReportedAsData) {
  up_.mutable_info().contexts = {};
  n_.info = *up_.Info();
  n_.contexts = {{1, "base:allocation"}};
  auto r = Do(Req(kCmdBlockStatus, 0, kSize));
  ASSERT_EQ(r.error, 0u);
  EXPECT_EQ(testing::DecodeBlockStatus(r.chunks[0].data).extents,
            (std::vector<std::pair<uint32_t, uint32_t>>{{kSize, 0}}));
  EXPECT_EQ(up_.block_status_calls(), 0u);
}

// The inline path and the pool path share one encoder: once the cache is
// warm, AnswerFromCache() gives byte for byte the reply Handle() gives,
// for random requests with and without REQ_ONE over both contexts (so
// REQ_ONE's one descriptor, never past the request, holds on both paths);
// on a cold or partly cold cache it answers nothing and counts nothing.
TEST_F(HandlerTest, AnswerFromCacheEqualsHandleAndCountsOnlyHits) {
  RequestHandler h(n_, &cache_);
  const CacheKey base{"a", "base:allocation"};
  auto cold = h.AnswerFromCache(Req(kCmdBlockStatus, 0, kBlock));
  EXPECT_FALSE(cold.has_value());
  EXPECT_EQ(cache_.Counters(base).hits + cache_.Counters(base).misses, 0u);
  (void)Do(Req(kCmdBlockStatus, 0, kSize));  // warms both contexts
  std::mt19937_64 rng(7);
  for (int i = 0; i < 300; ++i) {
    const uint64_t off = rng() % kSize;
    const uint32_t len = static_cast<uint32_t>(1 + rng() % (kSize - off));
    const Request r = Req(kCmdBlockStatus, off, len,
                          (rng() & 1) ? kCmdFlagReqOne : uint16_t{0});
    const uint64_t hits = cache_.Counters(base).hits;
    auto inline_reply = h.AnswerFromCache(r);
    ASSERT_TRUE(inline_reply.has_value()) << off << "+" << len;
    EXPECT_EQ(cache_.Counters(base).hits, hits + 1);
    EXPECT_EQ(*inline_reply, h.Handle(r, "")) << off << "+" << len;
  }
  // Forget part of one context: a request over it is not answered inline,
  // not even for the context that still hits, and nothing is counted.
  cache_.Invalidate(CacheKey{"a", "qemu:dirty-bitmap:b1"}, 2 * kBlock, kBlock);
  const CacheKey bitmap{"a", "qemu:dirty-bitmap:b1"};
  const uint64_t hits = cache_.Counters(base).hits;
  const uint64_t misses = cache_.Counters(bitmap).misses;
  EXPECT_FALSE(
      h.AnswerFromCache(Req(kCmdBlockStatus, 2 * kBlock, kBlock)).has_value());
  EXPECT_EQ(cache_.Counters(base).hits, hits);
  EXPECT_EQ(cache_.Counters(bitmap).misses, misses);
}

}  // namespace
}  // namespace nbd
}  // namespace blockmeta
