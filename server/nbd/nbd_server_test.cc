// server/nbd/nbd_server_test.cc — the shim over real sockets with an
// in-memory upstream: bad input from a raw client (the connection
// survives or is dropped as the spec says, the server never wedges),
// mid-request hang-ups, many clients, the connection cap, the handshake
// timeout, read-only exports and export isolation. Real upstreams and real
// clients are tested in //tests/nbd.
#include "server/nbd/nbd_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/upstream/nbd_errors.h"
#include "tests/testing/eventually.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/nbd_request.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta {
namespace {

using nbd::Request;
using nbd::testing::DecodeBlockStatus;
using nbd::testing::RawClient;

constexpr uint64_t kSize = 4 << 20;
constexpr uint32_t kBlock = 64 << 10;

std::string TempSocket(const std::string& name) {
  std::string path = absl::StrCat(::testing::TempDir(), name, ".sock");
  if (path.size() > 100) path = absl::StrCat("/tmp/nbdtest-", getpid(), name);
  return path;
}

using nbd::testing::Req;
using nbd::testing::RequestBytes;

class NbdServerTest : public ::testing::Test {
 protected:
  void StartServer(const blockmeta::v1::NbdShimConfig& config = {}) {
    a_ = std::make_shared<FakeUpstream>(kSize, kBlock, true);
    b_ = std::make_shared<FakeUpstream>(kSize, kBlock, false);
    ro_ = std::make_shared<FakeUpstream>(kSize, kBlock, false);
    a_->Fill(0, kBlock, 'a');               // a: block 0 data
    b_->Fill(kSize - kBlock, kBlock, 'b');  // b: last block data
    std::vector<nbd::ShimExport> exports = {
        {"a", "export a", a_, false, absl::Seconds(5)},
        {"b", "", b_, false, absl::Seconds(5)},
        {"ro", "", ro_, /*read_only=*/true, absl::Seconds(5)},
    };
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options());
    server_ =
        std::make_unique<NbdServer>(std::move(exports), cache_.get(), config);
    sock_ = TempSocket("shim");
    auto port = server_->Start("127.0.0.1:0", sock_);
    ASSERT_TRUE(port.ok()) << port.status();
    port_ = *port;
    ASSERT_GT(port_, 0);
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::unique_ptr<RawClient> Connect() {
    auto c = RawClient::ConnectUnix(sock_);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
  std::unique_ptr<RawClient> Session(const std::string& name,
                                     bool structured = true) {
    auto c = Connect();
    auto h =
        c->Handshake(name, structured,
                     structured ? std::vector<std::string>{"base:allocation"}
                                : std::vector<std::string>{});
    EXPECT_TRUE(h.ok()) << h.status();
    return c;
  }
  // The server still serves a fresh client correctly.
  void ExpectHealthy() {
    auto c = Session("a");
    auto r = c->Call(Req(nbd::kCmdBlockStatus, 0, kBlock, nbd::kCmdFlagReqOne));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->error, 0u);
  }
  void WaitForNoConnections() {
    EXPECT_TRUE(testing::Eventually(
        [&] { return server_->ActiveConnections() == 0; }, absl::Seconds(10)));
    EXPECT_EQ(server_->ActiveConnections(), 0u);
  }

  std::shared_ptr<FakeUpstream> a_, b_, ro_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<NbdServer> server_;
  std::string sock_;
  int port_ = 0;
};

TEST_F(NbdServerTest, TcpAndUnixServeTheSameExport) {
  StartServer();
  auto tcp = RawClient::ConnectTcp(port_);
  ASSERT_TRUE(tcp.ok());
  auto h = (*tcp)->Handshake("a", false, {});
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->size, kSize);
  auto r = (*tcp)->Call(Req(nbd::kCmdRead, 0, 3), "", 3);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->data, "aaa");
  ExpectHealthy();
}

TEST_F(NbdServerTest, BadRequestsGetErrorsAndTheConnectionSurvives) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_payload_bytes(1 << 20);
  StartServer(config);
  auto c = Session("a");
  struct Case {
    Request r;
    uint32_t error;
  };
  for (const Case& k : std::vector<Case>{
           {Req(99, 0, 1), kNbdEinval},                       // unknown cmd
           {Req(nbd::kCmdRead, 0, 1, 1u << 10), kNbdEinval},  // unknown flag
           {Req(nbd::kCmdRead, kSize, 1), kNbdEinval},        // past the end
           {Req(nbd::kCmdRead, ~0ull - 1, 4), kNbdEinval},    // overflow
           {Req(nbd::kCmdRead, 0, 0), kNbdEinval},            // zero length
           {Req(nbd::kCmdBlockStatus, 0, 0), kNbdEinval},
           {Req(nbd::kCmdRead, 0, 2u << 20), kNbdEoverflow},  // oversize
           {Req(nbd::kCmdBlockStatus, kSize - 1, 2), kNbdEinval},
       }) {
    auto r = c->Call(k.r);
    ASSERT_TRUE(r.ok()) << nbd::CommandName(k.r.type) << " " << r.status();
    EXPECT_EQ(r->error, k.error) << nbd::CommandName(k.r.type);
  }
  // An oversize write's payload is skipped; the stream stays in sync.
  const uint32_t big = (1u << 20) + 1;
  auto r = c->Call(Req(nbd::kCmdWrite, 0, big, 0, 7), std::string(big, 'q'));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->error, kNbdEinval);
  EXPECT_EQ(r->handle, 7u);
  r = c->Call(Req(nbd::kCmdRead, 0, 2, 0, 8));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, 0u);
  EXPECT_EQ(r->chunks.at(0).data.substr(8), "aa");
  EXPECT_EQ(a_->data_calls(), 1u);  // only the last read reached upstream
}

TEST_F(NbdServerTest, BadMagicAndUnskippableWriteDisconnect) {
  StartServer();
  auto c = Session("a");
  ASSERT_TRUE(
      c->Send(RequestBytes(Req(nbd::kCmdRead, 0, 1), "", /*magic=*/0x58609513u))
          .ok());
  EXPECT_TRUE(c->WaitForClose());
  c = Session("a");
  ASSERT_TRUE(c->Send(RequestBytes(Req(nbd::kCmdWrite, 0, 0xffffffffu))).ok());
  EXPECT_TRUE(c->WaitForClose());
  ExpectHealthy();
}

TEST_F(NbdServerTest, ReadOnlyExportRefusesWritesWithEperm) {
  StartServer();
  auto c = Connect();
  auto h = c->Handshake("ro", true, {"base:allocation"});
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(h->flags & nbd::kFlagReadOnly);
  auto r = c->Call(Req(nbd::kCmdWrite, 0, 4), "abcd");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, kNbdEperm);
  r = c->Call(Req(nbd::kCmdWriteZeroes, 0, 4));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, kNbdEperm);
  EXPECT_EQ(ro_->data_calls(), 0u);
}

TEST_F(NbdServerTest, ExportsAreIsolated) {
  StartServer();
  auto ca = Session("a");
  auto cb = Session("b");
  auto ra = ca->Call(Req(nbd::kCmdBlockStatus, 0, kSize));
  auto rb = cb->Call(Req(nbd::kCmdBlockStatus, 0, kSize));
  ASSERT_TRUE(ra.ok() && rb.ok());
  using P = std::pair<uint32_t, uint32_t>;
  EXPECT_EQ(DecodeBlockStatus(ra->chunks[0].data).extents,
            (std::vector<P>{{kBlock, 0}, {kSize - kBlock, 3}}));
  EXPECT_EQ(DecodeBlockStatus(rb->chunks[0].data).extents,
            (std::vector<P>{{kSize - kBlock, 3}, {kBlock, 0}}));
  // A write to a is visible through a, and b's view does not change.
  ASSERT_EQ(
      ca->Call(Req(nbd::kCmdWrite, kBlock, 512), std::string(512, 'w'))->error,
      0u);
  ra = ca->Call(Req(nbd::kCmdBlockStatus, 0, kSize));
  EXPECT_EQ(DecodeBlockStatus(ra->chunks[0].data).extents,
            (std::vector<P>{{2 * kBlock, 0}, {kSize - 2 * kBlock, 3}}));
  rb = cb->Call(Req(nbd::kCmdBlockStatus, 0, kBlock, nbd::kCmdFlagReqOne));
  EXPECT_EQ(DecodeBlockStatus(rb->chunks[0].data).extents,
            (std::vector<P>{{kBlock, 3}}));
}

TEST_F(NbdServerTest, PipelinedRequestsAllGetReplies) {
  StartServer();
  auto c = Session("a");
  std::string batch;
  for (uint64_t i = 0; i < 64; ++i) {
    batch += RequestBytes(Req(i % 2 ? nbd::kCmdRead : nbd::kCmdBlockStatus,
                              i * 4096, 4096, 0, 1000 + i));
  }
  ASSERT_TRUE(c->Send(batch).ok());
  std::vector<bool> seen(64, false);
  for (int i = 0; i < 64; ++i) {
    auto r = c->ReadReply();
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_GE(r->handle, 1000u);
    ASSERT_LT(r->handle, 1064u);
    EXPECT_EQ(r->error, 0u);
    seen[r->handle - 1000] = true;
  }
  for (bool s : seen) EXPECT_TRUE(s);
}

TEST_F(NbdServerTest, HangUpsMidRequestAndMidPipelineAreHarmless) {
  StartServer();
  for (int cut : {0, 5, 27}) {  // mid-header
    auto c = Session("a");
    ASSERT_TRUE(
        c->Send(RequestBytes(Req(nbd::kCmdRead, 0, 512)).substr(0, cut)).ok());
  }
  {  // mid-payload
    auto c = Session("a");
    ASSERT_TRUE(
        c->Send(RequestBytes(Req(nbd::kCmdWrite, 0, 4096), "abc")).ok());
  }
  {  // a pipeline of big reads, then gone without reading the replies
    auto c = Session("a");
    std::string batch;
    for (int i = 0; i < 32; ++i) {
      batch += RequestBytes(Req(nbd::kCmdRead, 0, 1 << 20, 0, i));
    }
    ASSERT_TRUE(c->Send(batch).ok());
  }
  for (size_t cut = 0; cut < 60; cut += 7) {  // mid-handshake
    auto c = Connect();
    ASSERT_TRUE(c->Read(18).ok());
    std::string hs =
        nbd::testing::ClientFlags() +
        nbd::testing::Option(nbd::kOptGo, nbd::testing::GoData("a"));
    ASSERT_TRUE(c->Send(hs.substr(0, std::min(cut, hs.size()))).ok());
  }
  WaitForNoConnections();
  ExpectHealthy();
}

TEST_F(NbdServerTest, ManyClientsAtOnce) {
  StartServer();
  std::vector<std::thread> threads;
  threads.reserve(24);
  std::atomic<int> ok{0};
  for (int t = 0; t < 24; ++t) {
    threads.emplace_back([&, t] {
      auto c = RawClient::ConnectUnix(sock_);
      if (!c.ok()) return;
      const std::string name = t % 2 ? "a" : "b";
      if (!(*c)->Handshake(name, true, {"base:allocation"}).ok()) return;
      for (int i = 0; i < 50; ++i) {
        auto r = (*c)->Call(Req(nbd::kCmdBlockStatus, (i * 4096) % kSize,
                                kBlock, nbd::kCmdFlagReqOne));
        if (!r.ok() || r->error != 0 || r->chunks.size() != 1) return;
        auto d = (*c)->Call(Req(nbd::kCmdRead, i * 512, 512));
        if (!d.ok() || d->error != 0) return;
      }
      ok.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 24);
  // Two exports, one context each, fetched once each (single-flight).
  EXPECT_LE(a_->block_status_calls() + b_->block_status_calls(), 4u);
}

// At the cap, a new client stops the oldest connection still in its
// handshake; when every connection finished its handshake, it is refused.
TEST_F(NbdServerTest, ConnectionCap) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(2);
  config.set_idle_eviction_grace_ms(600000);  // sessions below stay
  StartServer(config);
  auto c1 = Connect();
  ASSERT_TRUE(c1->Read(18).ok());
  auto c2 = Connect();
  ASSERT_TRUE(c2->Read(18).ok());
  auto c3 = Connect();
  ASSERT_TRUE(c3->Read(18).ok());   // admitted
  EXPECT_TRUE(c1->WaitForClose());  // the oldest handshake made room
  EXPECT_EQ(server_->EvictedConnections(), 1u);
  c2.reset();
  c3.reset();
  WaitForNoConnections();
  auto s1 = Session("a");
  auto s2 = Session("b");
  auto c4 = Connect();
  EXPECT_TRUE(c4->WaitForClose());  // established sessions are kept
  EXPECT_GE(server_->RejectedConnections(), 1u);
  auto r = s1->Call(Req(nbd::kCmdRead, 0, 1));
  ASSERT_TRUE(r.ok()) << r.status();
  s1.reset();
  s2.reset();
  WaitForNoConnections();
  ExpectHealthy();
}

// Threads of this process (Linux).
size_t ThreadCount() {
  std::error_code ec;
  const std::filesystem::directory_iterator tasks("/proc/self/task", ec);
  return ec ? 0 : std::distance(begin(tasks), end(tasks));
}

// 100 established sessions cost about one thread each (plus the shared
// pool), not five.
TEST_F(NbdServerTest, HundredSessionsUnder150Threads) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(100);
  StartServer(config);
  const size_t before = ThreadCount();
  std::vector<std::unique_ptr<RawClient>> sessions;
  for (int i = 0; i < 100; ++i) {
    sessions.push_back(Session(i % 2 ? "a" : "b"));
    auto r = sessions.back()->Call(
        Req(nbd::kCmdBlockStatus, 0, kBlock, nbd::kCmdFlagReqOne));
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->error, 0u);
  }
  EXPECT_EQ(server_->ActiveConnections(), 100u);
  const size_t threads = ThreadCount();
  EXPECT_LT(threads, 150u) << "before the sessions: " << before;
  EXPECT_LE(threads - before, 100u + 16u);  // one per session + the pool
}

// A client that pipelines READs and never reads the replies pins at most
// the per-connection budget: the shim stops reading it (its sends block),
// and the write timeout ends the session.
TEST_F(NbdServerTest, ClientThatStopsReadingIsBoundedAndDropped) {
  blockmeta::v1::NbdShimConfig config;
  config.set_write_timeout_ms(1500);
  config.set_max_payload_bytes(1 << 20);
  config.set_max_inflight_bytes_per_connection(4 << 20);
  StartServer(config);
  auto c = Session("a");
  // Ask for 64 MiB of replies without reading any.
  int sndbuf = 64 << 10;
  setsockopt(c->fd(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  int sent = 0;
  for (; sent < 64; ++sent) {
    std::string req = RequestBytes(
        Req(nbd::kCmdRead, 0, 1 << 20, 0, static_cast<uint64_t>(sent)));
    if (send(c->fd(), req.data(), req.size(), MSG_DONTWAIT | MSG_NOSIGNAL) !=
        static_cast<ssize_t>(req.size())) {
      break;
    }
  }
  EXPECT_GT(sent, 8);
  // Without reading: the server must hang up (write timeout) while never
  // holding much more than the per-connection budget.
  uint64_t peak = 0;
  // poll() waits 20 ms per round; no extra sleep, so peak is sampled as
  // often as before.
  const bool closed = testing::Eventually(
      [&] {
        peak = std::max(peak, server_->BufferedBytes());
        struct pollfd p = {c->fd(), POLLRDHUP, 0};
        return poll(&p, 1, 20) > 0 && (p.revents & (POLLRDHUP | POLLHUP));
      },
      absl::Seconds(20), absl::ZeroDuration());
  EXPECT_TRUE(closed);
  EXPECT_LE(peak, (4u << 20) + (1u << 20) + 4096);
  WaitForNoConnections();
  EXPECT_EQ(server_->BufferedBytes(), 0u);
  ExpectHealthy();
}

// 200 hostile clients (idle, flooding NBD_OPT_LIST without reading,
// half-open mid-option, idle after the handshake), each reconnecting as
// soon as it is dropped, do not keep a good client out.
TEST_F(NbdServerTest, GoodClientGetsInDespite200HostileOnes) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(50);
  config.set_handshake_timeout_ms(3000);
  config.set_idle_timeout_ms(1000);
  config.set_write_timeout_ms(1000);
  StartServer(config);
  std::atomic<bool> stop{false};
  std::atomic<int> hostile_connects{0};
  std::vector<std::thread> hostile;
  hostile.reserve(200);
  for (int i = 0; i < 200; ++i) {
    hostile.emplace_back([&, i] {
      while (!stop.load()) {
        auto c = RawClient::ConnectUnix(sock_, absl::Milliseconds(200));
        if (!c.ok()) continue;
        hostile_connects.fetch_add(1);
        // A fifth of the established-idle kind at most (those are evicted
        // only after idle_eviction_grace_ms; see the test below).
        const int kind = (i % 4 == 3 && i >= 80) ? 0 : i % 4;
        if (kind == 1) {  // flood LIST, never read
          std::string flood = nbd::testing::ClientFlags();
          for (int k = 0; k < 64; ++k)
            flood += nbd::testing::Option(nbd::kOptList);
          while (!stop.load() && send((*c)->fd(), flood.data(), flood.size(),
                                      MSG_NOSIGNAL) > 0) {
            flood = std::string(flood.substr(4));
          }
        } else if (kind == 2) {  // half-open: part of an option, then nothing
          (*c)->Send(nbd::testing::ClientFlags() + "IHAVE").IgnoreError();
        } else if (kind == 3) {  // finish the handshake, then idle
          (*c)->Handshake("a", true, {"base:allocation"}).IgnoreError();
        }
        // kind 0 (idle) and the rest: wait until dropped.
        while (!stop.load()) {
          struct pollfd p = {(*c)->fd(), POLLIN, 0};
          if (poll(&p, 1, 50) > 0) {
            char buf[4096];
            if (kind != 1 && recv((*c)->fd(), buf, sizeof buf, 0) <= 0) break;
            if (kind == 1) {
              int err = 0;
              socklen_t len = sizeof err;
              getsockopt((*c)->fd(), SOL_SOCKET, SO_ERROR, &err, &len);
              if (err != 0 || (p.revents & (POLLHUP | POLLERR))) break;
              // Pacing, not a wait: this client never reads, so poll()
              // returns at once; do not spin.
              absl::SleepFor(absl::Milliseconds(50));
            }
          }
        }
      }
    });
  }
  // Wait until the hostile clients fill the server.
  EXPECT_TRUE(testing::Eventually(
      [&] { return server_->ActiveConnections() >= 50; }, absl::Seconds(20)));
  EXPECT_GE(server_->ActiveConnections(), 50u);
  int good = 0, attempts = 0;
  const absl::Time start = absl::Now();
  for (int i = 0; i < 10; ++i) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      ++attempts;
      auto c = RawClient::ConnectUnix(sock_, absl::Seconds(2));
      if (!c.ok()) continue;
      if (!(*c)->Handshake("a", true, {"base:allocation"}).ok()) continue;
      auto r =
          (*c)->Call(Req(nbd::kCmdBlockStatus, 0, kBlock, nbd::kCmdFlagReqOne));
      if (r.ok() && r->error == 0) {
        ++good;
        break;
      }
    }
  }
  const absl::Duration took = absl::Now() - start;
  stop.store(true);
  server_->Shutdown();  // drops every hostile connection
  for (auto& t : hostile) t.join();
  std::cout << good << " of 10 good clients in " << attempts << " attempts, "
            << took << "; server rejected " << server_->RejectedConnections()
            << ", evicted " << server_->EvictedConnections() << " handshakes\n";
  EXPECT_EQ(good, 10) << attempts << " attempts";
  EXPECT_LT(took, absl::Seconds(60));
  // Always a handshake to evict, so nobody is refused: at twice the cap
  // the server waits for evicted threads to end instead of accepting and
  // closing (before, 69-295 refusals in 3 of 8 ASan runs).
  EXPECT_EQ(server_->RejectedConnections(), 0u);
  EXPECT_GT(hostile_connects.load(), 200);  // they were dropped and retried
  EXPECT_GT(server_->EvictedConnections(), 0u);
}

class LearnedUpstream : public FakeUpstream {
 public:
  explicit LearnedUpstream(uint64_t learned)
      : FakeUpstream(kSize, kBlock, true), learned_(learned) {}
  uint64_t ChangeGranularity() const override { return learned_; }

 private:
  const uint64_t learned_;
};

// Per-export granularity: learned values win over the default (either
// way), a configured value is a floor, advertised block sizes too.
TEST(ExportInvalidateGranularity, LearnedConfiguredAndAdvertised) {
  blockmeta::v1::NbdShimConfig dflt, set;
  set.set_invalidate_granularity_bytes(1 << 20);
  auto g = [](const blockmeta::v1::NbdShimConfig& c, Upstream* u) {
    const std::shared_ptr<Upstream> ref = Unowned(u);
    nbd::ShimExport e;
    e.upstream = ref;
    return ExportInvalidateGranularity(c, e);
  };
  LearnedUpstream unknown(0), coarse(4u << 20), fine(64u << 10), tiny(512);
  unknown.mutable_info().preferred_block_size = 4096;
  EXPECT_EQ(g(dflt, &unknown), 2u << 20);  // nothing learned: the default
  EXPECT_EQ(g(set, &unknown), 1u << 20);
  EXPECT_EQ(g(dflt, &coarse), 4u << 20);  // a 4 MiB bitmap beats 2 MiB
  EXPECT_EQ(g(set, &coarse), 4u << 20);
  EXPECT_EQ(g(dflt, &fine), 64u << 10);  // exact: 64 KiB clusters
  EXPECT_EQ(g(set, &fine), 1u << 20);    // the configured floor
  EXPECT_EQ(g(dflt, &tiny), 64u << 10);  // never below 64 KiB when learned
  tiny.mutable_info().preferred_block_size = 128u << 10;
  EXPECT_EQ(g(dflt, &tiny), 128u << 10);  // nor below the preferred size
  set.set_invalidate_granularity_bytes(3000000);
  EXPECT_EQ(g(set, &unknown), 4u << 20);  // rounded up to a power of two
  EXPECT_EQ(g(dflt, nullptr), 2u << 20);
}

// Reads option replies until the final one of `opt`; returns its type.
absl::StatusOr<uint32_t> FinalReplyType(RawClient* c, uint32_t opt) {
  for (;;) {
    absl::StatusOr<std::string> hdr = c->Read(20);
    if (!hdr.ok()) return hdr.status();
    const auto* p = reinterpret_cast<const uint8_t*>(hdr->data());
    absl::StatusOr<std::string> data = c->Read(nbd::GetBe32(p + 16));
    if (!data.ok()) return data.status();
    const uint32_t type = nbd::GetBe32(p + 12);
    if (nbd::GetBe32(p + 8) == opt &&
        (type == nbd::kRepAck || (type & nbd::kRepErrBit))) {
      return type;
    }
  }
}

// Removing export "a": its sessions are closed; a connection still
// negotiating is refused "a" (politely, ERR_UNKNOWN) but may still enter
// "b"; sessions in "b", entered or about to enter, are untouched.
TEST_F(NbdServerTest, CloseExportClosesItsSessionsOnly) {
  StartServer();
  auto in_a = Session("a");
  auto in_b = Session("b");
  auto negotiating = Connect();
  ASSERT_TRUE(negotiating->Read(18).ok());
  ASSERT_TRUE(negotiating->Send(nbd::testing::ClientFlags()).ok());
  auto about_to_enter_b = Connect();
  ASSERT_TRUE(about_to_enter_b->Read(18).ok());

  EXPECT_EQ(server_->CloseExport("a", absl::Seconds(5)), 1u);
  EXPECT_TRUE(in_a->WaitForClose());
  auto r = in_b->Call(Req(nbd::kCmdRead, kSize - 1, 1));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->error, 0u);

  // LIST no longer names "a"; GO "a" is refused, the connection stays
  // usable, GO "b" enters.
  ASSERT_TRUE(negotiating->Send(nbd::testing::Option(nbd::kOptList)).ok());
  std::vector<std::string> listed;
  for (;;) {
    absl::StatusOr<std::string> hdr = negotiating->Read(20);
    ASSERT_TRUE(hdr.ok()) << hdr.status();
    const auto* p = reinterpret_cast<const uint8_t*>(hdr->data());
    absl::StatusOr<std::string> data = negotiating->Read(nbd::GetBe32(p + 16));
    ASSERT_TRUE(data.ok()) << data.status();
    const uint32_t type = nbd::GetBe32(p + 12);
    if (type != nbd::kRepServer) {
      EXPECT_EQ(type, nbd::kRepAck);
      break;
    }
    ASSERT_GE(data->size(), 4u);
    listed.push_back(data->substr(
        4, nbd::GetBe32(reinterpret_cast<const uint8_t*>(data->data()))));
  }
  EXPECT_EQ(std::find(listed.begin(), listed.end(), "a"), listed.end());
  EXPECT_NE(std::find(listed.begin(), listed.end(), "b"), listed.end());
  ASSERT_TRUE(
      negotiating
          ->Send(nbd::testing::Option(nbd::kOptGo, nbd::testing::GoData("a")))
          .ok());
  absl::StatusOr<uint32_t> t = FinalReplyType(negotiating.get(), nbd::kOptGo);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, nbd::kRepErrUnknown);
  ASSERT_TRUE(
      negotiating
          ->Send(nbd::testing::Option(nbd::kOptGo, nbd::testing::GoData("b")))
          .ok());
  t = FinalReplyType(negotiating.get(), nbd::kOptGo);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, nbd::kRepAck);
  r = negotiating->Call(Req(nbd::kCmdRead, kSize - 1, 1), "", 1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->error, 0u);
  EXPECT_EQ(r->data, "b");

  // A client that was negotiating when "a" went still enters "b".
  std::string go = nbd::testing::ClientFlags() +
                   nbd::testing::Option(nbd::kOptGo, nbd::testing::GoData("b"));
  ASSERT_TRUE(about_to_enter_b->Send(go).ok());
  t = FinalReplyType(about_to_enter_b.get(), nbd::kOptGo);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, nbd::kRepAck);
}

// Many clients enter "b" while "a" is removed over and over: none of them
// is ever closed, however its handshake interleaves with the removals.
TEST_F(NbdServerTest, CloseExportRacingHandshakes) {
  StartServer();
  std::atomic<bool> stop{false};
  std::atomic<int> b_sessions{0}, b_failures{0};
  std::vector<std::thread> clients;
  clients.reserve(8);
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&, i] {
      while (!stop.load()) {
        auto c = RawClient::ConnectUnix(sock_, absl::Seconds(5));
        if (!c.ok()) continue;
        const bool to_a = i % 2 == 1;
        absl::StatusOr<RawClient::Result> h =
            (*c)->Handshake(to_a ? "a" : "b", false, {});
        if (!h.ok()) {
          if (!to_a) {
            b_failures.fetch_add(1);
            ADD_FAILURE() << "GO b: " << h.status();
          }
          continue;
        }
        auto r = (*c)->Call(Req(nbd::kCmdRead, 0, 1), "", 1);
        if (!to_a) {
          if (!r.ok() || r->error != 0) {
            b_failures.fetch_add(1);
            ADD_FAILURE() << "READ b: "
                          << (r.ok() ? absl::OkStatus() : r.status());
          }
          b_sessions.fetch_add(1);
        }
      }
    });
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (b_sessions.load() < 300 && absl::Now() < deadline) {
    server_->CloseExport("a", absl::Seconds(5));
  }
  stop.store(true);
  for (auto& t : clients) t.join();
  EXPECT_GE(b_sessions.load(), 300);
  EXPECT_EQ(b_failures.load(), 0);
}

// N hostile clients finish the handshake and sit idle, reconnecting as
// soon as they are dropped. With idle eviction (the default) a good client
// still gets in and maps; with no_idle_eviction it is refused (so this
// test can fail). The good client races the N reconnecting hostile ones
// for each slot an eviction frees, so how long it takes is a lottery
// scaled by the machine (5.3 s once under ASan on a loaded 2-core CI box):
// the bound is on liveness (give_up), not speed; the time is printed.
void RunIdleEstablishedFlood(const std::string& sock, NbdServer* server,
                             bool expect_good) {
  constexpr int kCap = 20;
  std::atomic<bool> stop{false};
  std::atomic<int> established{0};
  std::vector<std::thread> hostile;
  hostile.reserve(kCap);
  for (int i = 0; i < kCap; ++i) {
    hostile.emplace_back([&] {
      while (!stop.load()) {
        auto c = RawClient::ConnectUnix(sock, absl::Milliseconds(500));
        if (!c.ok()) continue;
        if (!(*c)->Handshake("a", true, {"base:allocation"}).ok()) {
          absl::SleepFor(absl::Milliseconds(10));  // pacing the retry
          continue;
        }
        established.fetch_add(1);
        while (!stop.load()) {  // idle until dropped
          struct pollfd p = {(*c)->fd(), POLLIN, 0};
          if (poll(&p, 1, 20) > 0) break;
        }
        established.fetch_sub(1);
      }
    });
  }
  // Every slot holds an established session: no handshake to evict.
  EXPECT_TRUE(testing::Eventually([&] { return established.load() >= kCap; },
                                  absl::Seconds(20)));
  EXPECT_EQ(established.load(), kCap);
  EXPECT_EQ(server->ActiveConnections(), static_cast<size_t>(kCap));
  bool good = false;
  const absl::Time start = absl::Now();
  const absl::Time give_up = start + absl::Seconds(expect_good ? 30 : 2);
  while (!good && absl::Now() < give_up) {
    auto c = RawClient::ConnectUnix(sock, absl::Seconds(2));
    if (!c.ok()) continue;
    if (!(*c)->Handshake("a", true, {"base:allocation"}).ok()) {
      absl::SleepFor(absl::Milliseconds(20));  // pacing the retry
      continue;
    }
    good = true;
    for (int k = 0; k < 20 && good; ++k) {  // a map: 20 block-status calls
      auto r = (*c)->Call(Req(nbd::kCmdBlockStatus, k * kBlock, kBlock,
                              nbd::kCmdFlagReqOne, k));
      good = r.ok() && r->error == 0;
    }
  }
  const absl::Duration took = absl::Now() - start;
  stop.store(true);
  server->Shutdown();
  for (auto& th : hostile) th.join();
  EXPECT_EQ(good, expect_good) << "after " << took;
  std::cout << "good client " << (good ? "got in" : "refused") << " after "
            << took << ", " << server->EvictedIdleSessions()
            << " idle sessions evicted\n";
  if (expect_good) {
    EXPECT_GT(server->EvictedIdleSessions(), 0u);
  } else {
    EXPECT_EQ(server->EvictedIdleSessions(), 0u);
    EXPECT_GT(server->RejectedConnections(), 0u);
  }
}

TEST_F(NbdServerTest, IdleEstablishedFloodDoesNotLockOutAGoodClient) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(20);
  config.set_idle_eviction_grace_ms(300);
  StartServer(config);
  RunIdleEstablishedFlood(sock_, server_.get(), /*expect_good=*/true);
}

TEST_F(NbdServerTest, IdleEstablishedFloodLocksOutWithoutIdleEviction) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(20);
  config.set_idle_eviction_grace_ms(300);
  config.set_no_idle_eviction(true);
  StartServer(config);
  RunIdleEstablishedFlood(sock_, server_.get(), /*expect_good=*/false);
}

// A session that is not idle (a request being received) is never evicted,
// however long ago it last finished one; a freshly idle one (< grace)
// neither.
TEST_F(NbdServerTest, BusyAndRecentSessionsAreNotEvicted) {
  blockmeta::v1::NbdShimConfig config;
  config.set_max_connections(2);
  config.set_idle_eviction_grace_ms(300);
  config.set_admission_wait_ms(1);  // decided now: `recent` is recent
  StartServer(config);
  auto busy = Session("a");
  auto recent = Session("b");
  // `busy` starts a request and stalls in the middle of its header.
  std::string req = nbd::EncodeRequest(Req(nbd::kCmdRead, 0, 1));
  ASSERT_TRUE(busy->Send(req.substr(0, 10)).ok());
  absl::SleepFor(absl::Milliseconds(400));  // both past the grace, once
  auto r = recent->Call(Req(nbd::kCmdRead, kSize - 1, 1), "", 1);
  ASSERT_TRUE(r.ok()) << r.status();  // `recent` is active again
  auto c = Connect();
  EXPECT_TRUE(c->WaitForClose());  // refused: no victim
  EXPECT_EQ(server_->EvictedIdleSessions(), 0u);
  // The stalled request completes; both sessions still work.
  ASSERT_TRUE(busy->Send(req.substr(10)).ok());
  r = busy->ReadReply(1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->error, 0u);
  r = recent->Call(Req(nbd::kCmdRead, 0, 1), "", 1);
  ASSERT_TRUE(r.ok()) << r.status();
}

TEST_F(NbdServerTest, HandshakeTimeoutDropsIdleClients) {
  blockmeta::v1::NbdShimConfig config;
  config.set_handshake_timeout_ms(300);
  StartServer(config);
  auto c = Connect();
  ASSERT_TRUE(c->Read(18).ok());
  const absl::Time start = absl::Now();
  EXPECT_TRUE(c->WaitForClose());
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  // A session that completed its handshake is not subject to it.
  auto s = Session("a");
  // The delay is what is tested: idle past the 300 ms handshake timeout.
  absl::SleepFor(absl::Milliseconds(500));
  auto r = s->Call(Req(nbd::kCmdRead, 0, 1));
  ASSERT_TRUE(r.ok()) << r.status();
}

TEST_F(NbdServerTest, ShutdownWithOpenSessions) {
  StartServer();
  auto c1 = Session("a");
  auto c2 = Connect();
  server_->Shutdown();
  EXPECT_TRUE(c1->WaitForClose());
  EXPECT_TRUE(c2->WaitForClose());
  EXPECT_EQ(server_->ActiveConnections(), 0u);
}

}  // namespace
}  // namespace blockmeta
