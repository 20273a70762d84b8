// tests/service/server_options_test.cc — server settings a deployment
// relies on, each against a real BlockMetaServer and a real nbdkit
// upstream: TLS, mutual TLS, the Unix-socket listener, admission control
// (RESOURCE_EXHAUSTED), and graceful shutdown letting in-flight calls
// finish within the grace period.
#include <atomic>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::LoopbackChannel;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::StartServer;
using ::blockmeta::testing::TempDir;
using ::blockmeta::testing::UpstreamCommandsSent;
using ::blockmeta::testing::WaitExportsReady;
using ::blockmeta::testing::WaitUpstreamCommandsSent;

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A CA, a server cert for 127.0.0.1/localhost and a client cert, made with
// the openssl CLI.
void MakeCerts(const TempDir& dir) {
  auto run = [](const std::vector<std::string>& argv) {
    auto r = RunCommand(argv);
    ASSERT_TRUE(r.ok()) << r.status();
  };
  const std::string& d = dir.path();
  run({"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=blockmeta-test-ca", "-keyout", d + "/ca.key", "-out",
       d + "/ca.pem"});
  std::ofstream(d + "/server.ext")
      << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
  for (const std::string who : {"server", "client"}) {
    run({"openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj",
         absl::StrCat("/CN=", who), "-keyout",
         absl::StrCat(d, "/", who, ".key"), "-out",
         absl::StrCat(d, "/", who, ".csr")});
    std::vector<std::string> sign = {"openssl",
                                     "x509",
                                     "-req",
                                     "-in",
                                     absl::StrCat(d, "/", who, ".csr"),
                                     "-CA",
                                     d + "/ca.pem",
                                     "-CAkey",
                                     d + "/ca.key",
                                     "-CAcreateserial",
                                     "-days",
                                     "2",
                                     "-out",
                                     absl::StrCat(d, "/", who, ".pem")};
    if (who == "server") {
      sign.push_back("-extfile");
      sign.push_back(d + "/server.ext");
    }
    run(sign);
  }
}

class ServerOptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = NbdProcess::Start(
        {"nbdkit", "-U", "{sock}", "-f", "data", "data=@65536 1", "size=16M"});
    ASSERT_TRUE(up.ok()) << up.status();
    upstream_ = *std::move(up);
    auto slow =
        NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=delay",
                           "data", "data=1", "size=16M", "delay-extents=1"});
    ASSERT_TRUE(slow.ok()) << slow.status();
    slow_ = *std::move(slow);
  }

  v1::ServerConfig BaseConfig() {
    v1::ServerConfig c;
    c.set_grpc_listen("127.0.0.1:0");
    v1::ExportConfig* e = c.add_exports();
    e->set_name("disk");
    e->set_nbd_uri(upstream_->uri());
    v1::ExportConfig* s = c.add_exports();
    s->set_name("slow");
    s->set_nbd_uri(slow_->uri());
    s->set_connections(8);
    return c;
  }

  static grpc::Status ListExports(const std::shared_ptr<grpc::Channel>& ch,
                                  v1::ListExportsResponse* r = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    v1::ListExportsResponse tmp;
    return v1::BlockMeta::NewStub(ch)->ListExports(&ctx, {}, r ? r : &tmp);
  }

  // Creates and starts a server on `config`, waits until its exports are
  // connected, and returns a plaintext channel to it.
  static std::shared_ptr<grpc::Channel> StartReady(
      const v1::ServerConfig& config,
      std::unique_ptr<BlockMetaServer>* server) {
    auto started = StartServer(config);
    EXPECT_TRUE(started.ok()) << started.status();
    if (!started.ok()) return nullptr;
    *server = *std::move(started);
    auto ch = LoopbackChannel(**server);
    absl::Status ready = WaitExportsReady(ch);
    EXPECT_TRUE(ready.ok()) << ready;
    return ch;
  }

  TempDir tmp_;
  std::unique_ptr<NbdProcess> upstream_;
  std::unique_ptr<NbdProcess> slow_;
};

TEST_F(ServerOptionsTest, TlsAndMutualTls) {
  MakeCerts(tmp_);
  const std::string d = tmp_.path();
  v1::ServerConfig c = BaseConfig();
  c.mutable_tls()->set_cert_file(d + "/server.pem");
  c.mutable_tls()->set_key_file(d + "/server.key");
  c.mutable_tls()->set_client_ca_file(d + "/ca.pem");
  auto server = BlockMetaServer::Create(c);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  std::string target = absl::StrCat("127.0.0.1:", (*server)->grpc_port());

  grpc::SslCredentialsOptions with_cert;
  with_cert.pem_root_certs = Slurp(d + "/ca.pem");
  with_cert.pem_private_key = Slurp(d + "/client.key");
  with_cert.pem_cert_chain = Slurp(d + "/client.pem");
  auto good = grpc::CreateChannel(target, grpc::SslCredentials(with_cert));
  EXPECT_TRUE(ListExports(good).ok());

  grpc::SslCredentialsOptions no_cert;
  no_cert.pem_root_certs = Slurp(d + "/ca.pem");
  auto anon = grpc::CreateChannel(target, grpc::SslCredentials(no_cert));
  EXPECT_THAT(ListExports(anon), StatusIs(grpc::StatusCode::UNAVAILABLE))
      << "mTLS must refuse a client without a certificate";

  auto plain = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  EXPECT_THAT(ListExports(plain), StatusIs(grpc::StatusCode::UNAVAILABLE));
  (*server)->Shutdown(absl::Seconds(1));
}

TEST_F(ServerOptionsTest, BadTlsConfigIsAClearError) {
  v1::ServerConfig c = BaseConfig();
  c.mutable_tls()->set_cert_file(tmp_.File("missing.pem"));
  auto server = BlockMetaServer::Create(c);
  ASSERT_TRUE(server.ok());
  absl::Status s = (*server)->Start();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(s.message().find("key_file"), absl::string_view::npos) << s;
  c.mutable_tls()->set_key_file(tmp_.File("missing.key"));
  server = BlockMetaServer::Create(c);
  ASSERT_TRUE(server.ok());
  s = (*server)->Start();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(s.message().find("missing"), absl::string_view::npos) << s;
}

TEST_F(ServerOptionsTest, UnixSocketListener) {
  // Keep the path short: Unix socket paths are limited to 107 bytes.
  std::string sock = absl::StrCat("/tmp/bm-grpc-", getpid(), ".sock");
  v1::ServerConfig c = BaseConfig();
  c.clear_grpc_listen();
  c.set_grpc_unix_socket(sock);
  auto server = BlockMetaServer::Create(c);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  auto ch =
      grpc::CreateChannel("unix:" + sock, grpc::InsecureChannelCredentials());
  EXPECT_TRUE(ListExports(ch).ok());
  (*server)->Shutdown(absl::Seconds(1));
  ::unlink(sock.c_str());
}

TEST_F(ServerOptionsTest, OverloadIsAnsweredWithResourceExhausted) {
  v1::ServerConfig c = BaseConfig();
  c.mutable_grpc()->set_max_inflight_calls(2);
  std::unique_ptr<BlockMetaServer> server;
  auto ch = StartReady(c, &server);
  ASSERT_NE(server, nullptr);
  std::atomic<int> ok{0}, exhausted{0}, other{0};
  constexpr int kCallers = 8;
  std::vector<std::thread> threads;
  threads.reserve(kCallers);
  for (int i = 0; i < kCallers; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
      v1::GetExtentsRequest req;
      req.set_export_name("slow");
      req.set_offset(static_cast<uint64_t>(i) * 4096);
      req.set_length(4096);
      req.set_cache_mode(v1::CACHE_MODE_BYPASS);  // every call is slow
      v1::GetExtentsResponse r;
      grpc::Status s = v1::BlockMeta::NewStub(ch)->GetExtents(&ctx, req, &r);
      if (s.ok()) {
        ok++;
      } else if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        exhausted++;
        EXPECT_NE(s.error_message().find("limit"), std::string::npos);
      } else {
        other++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GE(ok.load(), 1);
  EXPECT_LE(ok.load(), kCallers - 1) << "some calls must have been refused";
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_EQ(other.load(), 0);
  // Once the burst is over the server admits calls again.
  EXPECT_TRUE(ListExports(ch).ok());
  server->Shutdown(absl::Seconds(1));
}

TEST_F(ServerOptionsTest, ASlowExportDoesNotStarveAnother) {
  // Each export has its own worker pool: misses piling up on a slow
  // upstream (3 s per extents call) must not delay a miss on another.
  auto very_slow =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=delay",
                         "memory", "16M", "delay-extents=3"});
  ASSERT_TRUE(very_slow.ok()) << very_slow.status();
  v1::ServerConfig c = BaseConfig();
  c.set_metrics_listen("127.0.0.1:0");
  c.set_worker_threads(2);
  v1::ExportConfig* e = c.add_exports();
  e->set_name("very_slow");
  e->set_nbd_uri((*very_slow)->uri());
  e->set_connections(8);
  std::unique_ptr<BlockMetaServer> server;
  auto ch = StartReady(c, &server);
  ASSERT_NE(server, nullptr);
  auto call = [&](const std::string& name, uint64_t offset) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    v1::GetExtentsRequest req;
    req.set_export_name(name);
    req.set_offset(offset);
    req.set_length(4096);
    req.set_cache_mode(v1::CACHE_MODE_BYPASS);  // always the upstream
    v1::GetExtentsResponse r;
    return v1::BlockMeta::NewStub(ch)->GetExtents(&ctx, req, &r);
  };
  const double sent = UpstreamCommandsSent(*server, "very_slow");
  constexpr int kSlowCalls = 6;
  std::vector<std::thread> slow_calls;
  slow_calls.reserve(kSlowCalls);
  for (int i = 0; i < kSlowCalls; ++i) {
    slow_calls.emplace_back([&, i] {
      EXPECT_TRUE(call("very_slow", static_cast<uint64_t>(i) * 4096).ok());
    });
  }
  // very_slow holds its share of the pool (per_export_cap = 1 of the 2
  // threads) once one of its calls waits at the upstream.
  absl::Status busy = WaitUpstreamCommandsSent(*server, "very_slow", sent);
  EXPECT_TRUE(busy.ok()) << busy;
  const absl::Time start = absl::Now();
  grpc::Status fast = call("disk", 0);
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(fast.ok()) << fast.error_message();
  // With one shared pool of 2 threads this waits behind 3 s calls.
  EXPECT_LT(took, absl::Milliseconds(1500));
  for (auto& t : slow_calls) t.join();
  server->Shutdown(absl::Seconds(1));
}

TEST_F(ServerOptionsTest, GracefulShutdownLetsInFlightCallsFinish) {
  v1::ServerConfig c = BaseConfig();
  c.set_metrics_listen("127.0.0.1:0");
  std::unique_ptr<BlockMetaServer> server;
  auto ch = StartReady(c, &server);
  ASSERT_NE(server, nullptr);
  grpc::Status in_flight;
  const double sent = UpstreamCommandsSent(*server, "slow");
  std::thread call([&] {
    grpc::ClientContext ctx;
    v1::GetExtentsRequest req;
    req.set_export_name("slow");
    req.set_length(4096);
    req.set_cache_mode(v1::CACHE_MODE_BYPASS);
    v1::GetExtentsResponse r;
    in_flight = v1::BlockMeta::NewStub(ch)->GetExtents(&ctx, req, &r);
  });
  // The call is in flight: at the upstream, which answers in 1 s.
  absl::Status waiting = WaitUpstreamCommandsSent(*server, "slow", sent);
  EXPECT_TRUE(waiting.ok()) << waiting;
  absl::Time start = absl::Now();
  server->Shutdown(absl::Seconds(10));
  call.join();
  EXPECT_TRUE(in_flight.ok()) << in_flight.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_THAT(ListExports(ch), StatusIs(grpc::StatusCode::UNAVAILABLE));
}

TEST_F(ServerOptionsTest, CsiFixedLengthBlocks) {
  // The "disk" upstream has one data byte at 64 KiB in a 16 MiB volume.
  v1::ServerConfig c = BaseConfig();
  c.mutable_csi()->set_fixed_block_size(1 << 20);
  std::unique_ptr<BlockMetaServer> server;
  auto ch = StartReady(c, &server);
  ASSERT_NE(server, nullptr);
  for (int64_t start : {0, 100000}) {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataAllocatedRequest req;
    req.set_snapshot_id("disk");
    req.set_starting_offset(start);
    auto reader =
        csi::v1::SnapshotMetadata::NewStub(ch)->GetMetadataAllocated(&ctx, req);
    csi::v1::GetMetadataAllocatedResponse msg;
    std::vector<std::pair<int64_t, int64_t>> got;
    while (reader->Read(&msg)) {
      EXPECT_EQ(msg.block_metadata_type(), csi::v1::FIXED_LENGTH);
      EXPECT_EQ(msg.volume_capacity_bytes(), 16 << 20);
      for (const auto& b : msg.block_metadata()) {
        got.push_back({b.byte_offset(), b.size_bytes()});
      }
    }
    ASSERT_TRUE(reader->Finish().ok());
    // The block holding the data byte, rounded out to the 1 MiB block.
    ASSERT_EQ(got.size(), 1u) << "start " << start;
    EXPECT_EQ(got[0], (std::pair<int64_t, int64_t>{0, 1 << 20}));
    EXPECT_GT(got[0].first + got[0].second, start) << "ends after start";
  }
  v1::ServerConfig bad = BaseConfig();
  bad.mutable_csi()->set_fixed_block_size(1000);
  EXPECT_THAT(BlockMetaServer::Create(bad),
              StatusIs(absl::StatusCode::kInvalidArgument));
  server->Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace blockmeta
