// server/common/tls_grpc_test.cc — certificate rotation under a running
// gRPC server (ReloadingServerCredentials) and TlsCredentials reloading,
// with certificates made by the openssl CLI.
#include "server/common/tls_grpc.h"

#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/common/tls_credentials.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

// TEST_TMPDIR (or /tmp), without the trailing slash TempDir() gives.
std::string Dir() {
  std::string d = ::testing::TempDir();
  if (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

std::string Read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void Write(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << data;
}

// Renames a new version over `path` (atomic, as secret volumes rotate).
void Replace(const std::string& path, const std::string& data) {
  Write(path + ".new", data);
  ASSERT_EQ(rename((path + ".new").c_str(), path.c_str()), 0);
}

// Runs `cmd` with /bin/sh and returns its wait status, as system() would,
// without system()'s process-wide signal changes (gRPC threads run).
int RunShell(const std::string& cmd) {
  const char* argv[] = {"sh", "-c", cmd.c_str(), nullptr};
  pid_t pid;
  if (posix_spawn(&pid, "/bin/sh", nullptr, nullptr,
                  const_cast<char* const*>(argv), environ) != 0) {
    return -1;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return status;
}

// CA NAME and a server certificate for localhost signed by it.
void MakePki(const std::string& name) {
  const std::string p = Dir() + "/" + name;
  Write(p + ".ext", "subjectAltName=DNS:localhost\n");
  const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 ";
  const std::string cmd = absl::StrCat(
      "openssl req -x509", ec, "-nodes -days 2 -subj /CN=", name,
      "-ca -keyout ", p, "-ca-key.pem -out ", p,
      "-ca.pem 2>/dev/null && openssl req", ec,
      "-nodes -subj /CN=localhost -keyout ", p, "-key.pem -out ", p,
      ".csr 2>/dev/null && openssl x509 -req -in ", p, ".csr -CA ", p,
      "-ca.pem -CAkey ", p, "-ca-key.pem -CAcreateserial -days 2 -extfile ", p,
      ".ext -out ", p, "-cert.pem 2>/dev/null");
  ASSERT_EQ(RunShell(cmd), 0) << cmd;
}

// True when a TLS channel trusting `ca` connects (the handshake passed).
bool Connects(int port, const std::string& ca) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = Read(ca);
  grpc::ChannelArguments args;
  args.SetInt("grpc.use_local_subchannel_pool", 1);  // no shared subchannel
  // An IP target: no DNS resolver (Debian's c-ares leaks under LSan).
  args.SetSslTargetNameOverride("localhost");
  auto channel = grpc::CreateCustomChannel(
      absl::StrCat("ipv4:127.0.0.1:", port), grpc::SslCredentials(o), args);
  return channel->WaitForConnected(std::chrono::system_clock::now() +
                                   std::chrono::seconds(3));
}

TEST(ReloadingServerCredentials, RotatedCertificateIsServedWithoutARestart) {
  MakePki("one");
  MakePki("two");
  const std::string d = Dir();
  const std::string cert = d + "/server-cert.pem", key = d + "/server-key.pem";
  Write(cert, Read(d + "/one-cert.pem"));
  Write(key, Read(d + "/one-key.pem"));
  auto creds = ReloadingServerCredentials({cert, key, ""}, 1);
  ASSERT_TRUE(creds.ok()) << creds.status();
  grpc::CallbackGenericService generic;  // a server needs a service
  grpc::ServerBuilder builder;
  builder.RegisterCallbackGenericService(&generic);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", *creds, &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(Connects(port, d + "/one-ca.pem"));
  EXPECT_FALSE(Connects(port, d + "/two-ca.pem"));
  Replace(key, Read(d + "/two-key.pem"));
  Replace(cert, Read(d + "/two-cert.pem"));
  bool rotated = false;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!rotated && absl::Now() < deadline) {
    rotated = Connects(port, d + "/two-ca.pem");
  }
  EXPECT_TRUE(rotated);
  EXPECT_FALSE(Connects(port, d + "/one-ca.pem"));
  server->Shutdown();
}

TEST(ReloadingServerCredentials, BadFilesFailAtStartUp) {
  auto c = ReloadingServerCredentials({"/nonexistent/cert.pem", "/x", ""});
  EXPECT_THAT(c, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(c.status().message().find("/nonexistent/cert.pem"),
            std::string::npos);
}

TEST(TlsCredentials, ReloadsOnChangeAndKeepsTheLastGoodOnes) {
  MakePki("three");
  MakePki("four");
  const std::string d = Dir();
  const std::string cert = d + "/r-cert.pem", key = d + "/r-key.pem";
  Write(cert, Read(d + "/three-cert.pem"));
  Write(key, Read(d + "/three-key.pem"));
  auto t = TlsCredentials::Create({cert, key, ""}, absl::ZeroDuration());
  ASSERT_TRUE(t.ok()) << t.status();
  TlsCredentials::Credentials first = (*t)->Get();
  EXPECT_EQ((*t)->Get(), first);  // unchanged files: the same credentials
  EXPECT_EQ((*t)->loads(), 1);
  Replace(key, Read(d + "/four-key.pem"));
  Replace(cert, Read(d + "/four-cert.pem"));
  TlsCredentials::Credentials second = (*t)->Get();
  EXPECT_NE(second, first);
  EXPECT_EQ((*t)->loads(), 2);
  Replace(cert, "not a certificate");  // a broken rotation
  EXPECT_EQ((*t)->Get(), second);
  EXPECT_EQ((*t)->loads(), 2);
}

}  // namespace
}  // namespace blockmeta
