// client/blockmeta_client_test.cc — the client library against an
// in-process fake BlockMeta server: unary calls, status codes, TLS files,
// and the ExtentIterator's contiguity checks and resume after transient
// errors (injected by the fake).
#include "client/blockmeta_client.h"

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_blockmeta_server.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::StatusIs;

using testing::FakeServer;
using testing::kDiskSize;
using testing::kExtentSize;

std::unique_ptr<BlockMetaClient> ConnectTo(
    const std::string& target, absl::Duration deadline = absl::Seconds(10)) {
  ClientOptions o;
  o.target = target;
  o.deadline = deadline;
  o.retry.initial_backoff = absl::Milliseconds(10);
  o.retry.max_backoff = absl::Milliseconds(50);
  auto c = BlockMetaClient::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return *std::move(c);
}

// A short directory for Unix sockets ($TEST_TMPDIR is too long for
// sun_path), removed at exit of the scope.
class SocketDir {
 public:
  SocketDir() {
    char tmpl[] = "/tmp/bmclient.XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~SocketDir() { std::filesystem::remove_all(path_); }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Drains an iterator; checks contiguity from `offset`.
absl::StatusOr<std::vector<v1::Extent>> Drain(ExtentIterator* it,
                                              uint64_t offset) {
  std::vector<v1::Extent> out;
  v1::Extent e;
  uint64_t at = offset;
  while (true) {
    absl::StatusOr<bool> more = it->Next(&e);
    if (!more.ok()) return more.status();
    if (!*more) break;
    EXPECT_EQ(e.offset(), at);
    EXPECT_GT(e.length(), 0u);
    at = e.offset() + e.length();
    out.push_back(e);
  }
  return out;
}

TEST(BlockMetaClient, UnaryCalls) {
  FakeServer server;
  auto client = ConnectTo(server.address());
  auto list = client->ListExports();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->exports_size(), 1);
  EXPECT_EQ(list->exports(0).name(), "disk");

  auto info = client->GetExportInfo("disk");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size(), kDiskSize);
  EXPECT_THAT(client->GetExportInfo("nope"),
              StatusIs(absl::StatusCode::kNotFound));

  v1::GetExtentsRequest req;
  req.set_export_name("disk");
  req.set_length(3 * kExtentSize);
  auto ext = client->GetExtents(req);
  ASSERT_TRUE(ext.ok()) << ext.status();
  EXPECT_EQ(ext->extents_size(), 3);
  EXPECT_EQ(ext->next_offset(), 3 * kExtentSize);
  req.set_offset(kDiskSize);
  EXPECT_THAT(client->GetExtents(req), StatusIs(absl::StatusCode::kOutOfRange));

  v1::InvalidateCacheRequest inv;
  auto dropped = client->InvalidateCache(inv);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(dropped->extents_dropped(), 3u);

  auto stats = client->GetStats("");
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->total().hits(), 7u);
  EXPECT_THAT(client->GetStats("nope"), StatusIs(absl::StatusCode::kNotFound));

  server.service().unary_code = static_cast<int>(grpc::StatusCode::ABORTED);
  auto failed = client->ListExports();
  EXPECT_THAT(failed, StatusIs(absl::StatusCode::kAborted));
  EXPECT_EQ(failed.status().message(), "injected");
}

TEST(BlockMetaClient, Health) {
  FakeServer server;
  auto client = ConnectTo(server.address());
  auto h = client->Health("");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(*h, ServingStatus::kServing);
  server.SetServing(false);
  EXPECT_EQ(*client->Health(""), ServingStatus::kNotServing);
  EXPECT_THAT(client->Health("no.such.Service"),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(BlockMetaClient, UnixSocket) {
  SocketDir dir;
  std::string path = dir.File("fake.sock");
  FakeServer server(path);
  auto client = ConnectTo("unix:" + path);
  EXPECT_TRUE(client->ListExports().ok());
}

TEST(BlockMetaClient, UnreachableIsUnavailableAndFast) {
  // Bind a port, then close it, so nothing listens there.
  std::string address;
  {
    FakeServer server;
    address = server.address();
  }
  auto client = ConnectTo(address);
  absl::Time start = absl::Now();
  absl::Status s = client->ListExports().status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(IsServerUnreachable(s)) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  auto it = client->MapExtents(v1::MapExtentsRequest());
  v1::Extent e;
  s = it->Next(&e).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(IsServerUnreachable(s)) << s;
  EXPECT_EQ(it->resumes(), 4);  // max_attempts 5: 4 retries.
}

TEST(BlockMetaClient, ConnectRejectsBadOptions) {
  ClientOptions o;
  o.target = "nohost";
  EXPECT_THAT(BlockMetaClient::Connect(o),
              StatusIs(absl::StatusCode::kInvalidArgument));
  o.target = "localhost:1";
  o.tls.enabled = true;
  o.tls.ca_file = "/nonexistent/ca.pem";
  EXPECT_THAT(BlockMetaClient::Connect(o),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(ExtentIterator, WholeDiskAndSubrange) {
  FakeServer server;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  auto it = client->MapExtents(req);
  auto all = Drain(it.get(), 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), kDiskSize / kExtentSize);
  EXPECT_EQ(it->position(), kDiskSize);
  EXPECT_EQ(it->range_end(), kDiskSize);
  EXPECT_EQ(it->export_size(), kDiskSize);
  EXPECT_EQ(it->context(), "base:allocation");
  v1::Extent e;
  EXPECT_FALSE(*it->Next(&e));  // Stays finished.

  req.set_offset(1000);
  req.set_length(kExtentSize * 2);
  auto sub = client->MapExtents(req);
  auto part = Drain(sub.get(), 1000);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(sub->position(), 1000 + 2 * kExtentSize);
  EXPECT_EQ(part->size(), 3u);

  // Range past the end is clipped.
  req.set_offset(kDiskSize - 10);
  req.set_length(1000);
  auto tail = client->MapExtents(req);
  auto t = Drain(tail.get(), kDiskSize - 10);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(tail->position(), kDiskSize);
}

TEST(ExtentIterator, PermanentErrorsAreNotRetried) {
  FakeServer server;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("nope");
  auto it = client->MapExtents(req);
  v1::Extent e;
  EXPECT_THAT(it->Next(&e), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(it->Next(&e), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(it->resumes(), 0);
  EXPECT_EQ(server.service().map_calls, 1);

  req.set_export_name("disk");
  req.set_context("qemu:dirty-bitmap:zz");
  EXPECT_THAT(client->MapExtents(req)->Next(&e),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(ExtentIterator, ResumesAfterUnavailable) {
  FakeServer server;
  server.service().fail_streams = 3;
  server.service().fail_after_batches = 2;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  auto it = client->MapExtents(req);
  auto all = Drain(it.get(), 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), kDiskSize / kExtentSize);  // Nothing repeated.
  EXPECT_EQ(it->resumes(), 3);
  EXPECT_EQ(server.service().map_calls, 4);
}

TEST(ExtentIterator, ResumesAfterResourceExhaustedAndAborted) {
  FakeServer server;
  server.service().fail_streams = 1;
  server.service().fail_code =
      static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED);
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  auto it = client->MapExtents(req);
  ASSERT_TRUE(Drain(it.get(), 0).ok());
  EXPECT_EQ(it->resumes(), 1);
}

TEST(ExtentIterator, GivesUpAfterMaxAttemptsWithoutProgress) {
  FakeServer server;
  server.service().fail_streams = 100;
  server.service().fail_after_batches = 0;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  auto it = client->MapExtents(req);
  auto r = Drain(it.get(), 0);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_NE(r.status().message().find("after 5 attempts"), std::string::npos)
      << r.status();
  // The server answered each UNAVAILABLE itself: it is there.
  EXPECT_FALSE(IsServerUnreachable(r.status())) << r.status();
  EXPECT_EQ(server.service().map_calls, 5);
}

TEST(ExtentIterator, ProgressResetsTheAttemptCounter) {
  // Every stream fails after one batch, more often than max_attempts, but
  // each makes progress, so the map completes.
  FakeServer server;
  server.service().fail_streams = 20;
  server.service().fail_after_batches = 1;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  req.set_batch_size(16);
  auto it = client->MapExtents(req);
  auto all = Drain(it.get(), 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), kDiskSize / kExtentSize);
  EXPECT_EQ(it->resumes(), 15);  // 256 extents / 16 per stream - 1.
}

TEST(ExtentIterator, StalledBatchTimesOutAndResumes) {
  FakeServer server;
  server.service().stall_streams = 1;
  server.service().stall_after = 2;
  server.service().stall_ms = 5000;
  auto client = ConnectTo(server.address(), absl::Milliseconds(300));
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  absl::Time start = absl::Now();
  auto it = client->MapExtents(req);
  auto all = Drain(it.get(), 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), kDiskSize / kExtentSize);
  EXPECT_EQ(it->resumes(), 1);
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

TEST(ExtentIterator, ServerRestartMidMap) {
  SocketDir dir;
  std::string path = dir.File("restart.sock");
  auto server = std::make_unique<FakeServer>(path);
  auto client = ConnectTo("unix:" + path);
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  req.set_batch_size(1);
  // The first stream stalls after two batches, so the server dies with the
  // stream open.
  server->service().stall_streams = 1;
  server->service().stall_after = 2;
  server->service().stall_ms = 10000;
  auto it = client->MapExtents(req);
  v1::Extent e;
  ASSERT_TRUE(*it->Next(&e));
  ASSERT_TRUE(*it->Next(&e));
  // Kill the server mid-stream and start a new one on the same socket.
  server.reset();
  server = std::make_unique<FakeServer>(path);
  uint64_t at = e.offset() + e.length();
  while (true) {
    absl::StatusOr<bool> more = it->Next(&e);
    ASSERT_TRUE(more.ok()) << more.status();
    if (!*more) break;
    ASSERT_EQ(e.offset(), at);
    at += e.length();
  }
  EXPECT_EQ(at, kDiskSize);
  EXPECT_GE(it->resumes(), 1);
}

TEST(ExtentIterator, ContractViolationIsInternal) {
  FakeServer server;
  server.service().send_gap = true;
  auto client = ConnectTo(server.address());
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  auto it = client->MapExtents(req);
  auto r = Drain(it.get(), 0);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kInternal));
  EXPECT_EQ(it->resumes(), 0);
}

}  // namespace
}  // namespace blockmeta::client
