// tests/process/instance_test.cc — one blockmetad per address (issue 21
// item 5), with real processes: a second blockmetad on a gRPC port, gRPC
// Unix socket, NBD port or NBD Unix socket already in use fails to start
// with a clear message and a non-zero exit, and the first keeps its socket
// files (same inode) and keeps answering. A socket file left by a
// SIGKILLed server is reused; at exit a server removes only a socket file
// that is still its own.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

using ::testing::HasSubstr;

ino_t Inode(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

bool Exists(const std::string& path) { return Inode(path) != 0; }

// Whether an NBD server answers at `uri` (nbdinfo --list: a full
// handshake).
bool NbdAnswers(const std::string& uri) {
  absl::StatusOr<std::string> out =
      RunCommand({"nbdinfo", "--list", uri}, absl::Seconds(30));
  if (!out.ok()) ADD_FAILURE() << out.status();
  return out.ok();
}

// A blockmetad started with exactly `flags` (no fixture socket), killed
// (SIGKILL) and reaped at destruction; its stderr goes to a file.
class Daemon {
 public:
  Daemon(const std::vector<std::string>& flags, const std::string& log)
      : log_(log) {
    std::vector<std::string> argv = {RunfilePath("server/blockmetad"),
                                     "--log_format=text"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    std::vector<char*> args;
    args.reserve(argv.size() + 1);
    for (std::string& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, log.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&fa);
  }
  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  std::string Log() const {
    std::ifstream in(log_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  const std::string log_;
  pid_t pid_ = -1;
};

// Whether `blockmeta health` succeeds at `server`.
bool Healthy(const std::string& server) {
  return RunProgram({RunfilePath("client/blockmeta"), "health", "--timeout=5s",
                     "--server=" + server})
             .exit_code == 0;
}

// Runs a second blockmetad that must fail to start.
RunResult RunSecond(const std::vector<std::string>& flags) {
  std::vector<std::string> argv = {RunfilePath("server/blockmetad"),
                                   "--log_format=text"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  RunOptions o;
  o.timeout = absl::Seconds(30);
  return RunProgram(argv, o);
}

// "grpc=N nbd=N metrics=N" from --port_file, once written.
std::map<std::string, int> ReadPorts(const std::string& file) {
  std::map<std::string, int> ports;
  Eventually([&] {
    std::ifstream in(file);
    std::string line;
    if (!std::getline(in, line)) return false;
    for (absl::string_view kv : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
      std::pair<std::string, std::string> p = absl::StrSplit(kv, '=');
      int v = 0;
      if (absl::SimpleAtoi(p.second, &v)) ports[p.first] = v;
    }
    return ports.count("nbd") > 0;
  });
  return ports;
}

class InstanceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    nbd_sock_ = dir_.File("nbd.sock");
    auto s = Blockmetad::Start(
        {}, {"--grpc_listen=127.0.0.1:0", "--nbd_listen=127.0.0.1:0",
             "--nbd_unix_socket=" + nbd_sock_,
             "--port_file=" + dir_.File("ports")});
    ASSERT_TRUE(s.ok()) << s.status();
    first_ = *std::move(s);
    grpc_sock_ = first_->process().socket_path();
    ports_ = ReadPorts(dir_.File("ports"));
    ASSERT_GT(ports_["grpc"], 0);
    ASSERT_GT(ports_["nbd"], 0);
    grpc_inode_ = Inode(grpc_sock_);
    nbd_inode_ = Inode(nbd_sock_);
    ASSERT_NE(grpc_inode_, 0u);
    ASSERT_NE(nbd_inode_, 0u);
  }

  // The first server still owns its files and answers on each address.
  void ExpectFirstIntact() {
    EXPECT_EQ(Inode(grpc_sock_), grpc_inode_);
    EXPECT_EQ(Inode(nbd_sock_), nbd_inode_);
    EXPECT_EQ(first_->Cli({"health"}).exit_code, 0) << first_->Log();
    RunResult r =
        RunProgram({RunfilePath("client/blockmeta"), "health",
                    absl::StrCat("--server=127.0.0.1:", ports_["grpc"])});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    // The NBD shim answers on both (nbdinfo lists its exports: none).
    for (const std::string& uri :
         {absl::StrCat("nbd+unix:///?socket=", nbd_sock_),
          absl::StrCat("nbd://127.0.0.1:", ports_["nbd"], "/")}) {
      EXPECT_TRUE(NbdAnswers(uri)) << uri;
    }
  }

  TempDir dir_;
  std::string grpc_sock_, nbd_sock_;
  std::map<std::string, int> ports_;
  ino_t grpc_inode_ = 0, nbd_inode_ = 0;
  std::unique_ptr<Blockmetad> first_;
};

TEST_F(InstanceTest, SecondOnTheSameGrpcPortFails) {
  RunResult r =
      RunSecond({absl::StrCat("--grpc_listen=127.0.0.1:", ports_["grpc"])});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("listen_failed"));
  EXPECT_THAT(r.err, HasSubstr("address already in use (another blockmetad?)"));
  ExpectFirstIntact();
}

TEST_F(InstanceTest, SecondOnTheSameGrpcUnixSocketFails) {
  RunResult r = RunSecond(
      {"--grpc_listen=127.0.0.1:0", "--grpc_unix_socket=" + grpc_sock_});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("is in use: a server accepts connections"));
  ExpectFirstIntact();
}

TEST_F(InstanceTest, SecondOnTheSameNbdPortFails) {
  RunResult r =
      RunSecond({"--grpc_listen=127.0.0.1:0",
                 absl::StrCat("--nbd_listen=127.0.0.1:", ports_["nbd"])});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("Address already in use"));
  ExpectFirstIntact();
}

TEST_F(InstanceTest, SecondOnTheSameNbdUnixSocketFails) {
  RunResult r = RunSecond(
      {"--grpc_listen=127.0.0.1:0", "--nbd_unix_socket=" + nbd_sock_});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("is in use: a server accepts connections"));
  ExpectFirstIntact();
  // The refused instance left no private socket names behind.
  absl::StatusOr<std::string> ls = RunCommand({"ls", "-A", dir_.path()});
  ASSERT_TRUE(ls.ok()) << ls.status();
  EXPECT_EQ(*ls, "nbd.sock\nports\n");
}

TEST_F(InstanceTest, StaleSocketsOfAKilledServerAreReused) {
  first_->process().Kill();  // SIGKILL: the socket files stay
  ASSERT_TRUE(Exists(grpc_sock_));
  ASSERT_TRUE(Exists(nbd_sock_));
  Daemon second({"--grpc_unix_socket=" + grpc_sock_,
                 "--grpc_listen=127.0.0.1:0", "--nbd_unix_socket=" + nbd_sock_},
                dir_.File("second.log"));
  ASSERT_TRUE(Eventually([&] { return Healthy("unix:" + grpc_sock_); },
                         absl::Seconds(30), absl::Milliseconds(100)))
      << second.Log();
  EXPECT_NE(Inode(grpc_sock_), grpc_inode_);
  EXPECT_TRUE(Eventually([&] { return Inode(nbd_sock_) != nbd_inode_; }));
  EXPECT_TRUE(NbdAnswers(absl::StrCat("nbd+unix:///?socket=", nbd_sock_)));
}

TEST_F(InstanceTest, AtExitRemovesOnlyItsOwnSocketFiles) {
  // An operator removes the first server's files and starts a second
  // server on the same paths; then the first one stops.
  ASSERT_EQ(unlink(grpc_sock_.c_str()), 0);
  ASSERT_EQ(unlink(nbd_sock_.c_str()), 0);
  Daemon second({"--grpc_unix_socket=" + grpc_sock_,
                 "--grpc_listen=127.0.0.1:0", "--nbd_unix_socket=" + nbd_sock_},
                dir_.File("second.log"));
  ASSERT_TRUE(Eventually([&] { return Healthy("unix:" + grpc_sock_); },
                         absl::Seconds(30), absl::Milliseconds(100)))
      << second.Log();
  ASSERT_TRUE(Eventually([&] { return Exists(nbd_sock_); }));
  const ino_t grpc2 = Inode(grpc_sock_), nbd2 = Inode(nbd_sock_);
  ASSERT_EQ(kill(first_->process().pid(), SIGTERM), 0);
  // The first one has stopped once its TCP port refuses.
  ASSERT_TRUE(Eventually(
      [&] {
        return RunProgram({RunfilePath("client/blockmeta"), "health",
                           "--timeout=2s",
                           absl::StrCat("--server=127.0.0.1:", ports_["grpc"])})
                   .exit_code == 3;
      },
      absl::Seconds(60), absl::Milliseconds(200)))
      << first_->Log();
  // Its exit is logged last; wait for it, then look at the files.
  ASSERT_TRUE(Eventually(
      [&] { return first_->Log().find("stopped") != std::string::npos; },
      absl::Seconds(60), absl::Milliseconds(100)))
      << first_->Log();
  EXPECT_EQ(Inode(grpc_sock_), grpc2);
  EXPECT_EQ(Inode(nbd_sock_), nbd2);
  EXPECT_TRUE(Healthy("unix:" + grpc_sock_));
  EXPECT_TRUE(NbdAnswers(absl::StrCat("nbd+unix:///?socket=", nbd_sock_)));

  // A clean stop of the second removes its own files.
  ASSERT_EQ(kill(second.pid(), SIGTERM), 0);
  EXPECT_TRUE(
      Eventually([&] { return !Exists(grpc_sock_) && !Exists(nbd_sock_); },
                 absl::Seconds(60), absl::Milliseconds(100)))
      << second.Log();
}

}  // namespace
}  // namespace blockmeta::testing
