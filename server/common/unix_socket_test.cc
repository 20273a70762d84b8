// server/common/unix_socket_test.cc — OwnedUnixSocket against real sockets:
// a live listener is never replaced, a stale file is reused, other files are
// left alone, removal at exit only takes our own file, and of many
// listeners publishing one path at once exactly one wins.
#include "server/common/unix_socket.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

class UnixSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/bmusXXXXXX";  // short: sun_path has 108 bytes
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/s.sock";
  }
  void TearDown() override {
    for (int fd : fds_) close(fd);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    ASSERT_FALSE(ec) << ec.message();
  }

  // A listening socket bound at `at`; -1 on failure.
  int BindListen(const std::string& at) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {};
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, at.c_str(), at.size() + 1);
    if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 ||
        listen(fd, 8) != 0) {
      close(fd);
      return -1;
    }
    fds_.push_back(fd);
    return fd;
  }

  // Publishes a new listener at path_; its fd in *fd.
  absl::StatusOr<std::unique_ptr<OwnedUnixSocket>> Listen(int* fd) {
    std::string bound = PrivateBindPath(path_);
    *fd = BindListen(bound);
    EXPECT_GE(*fd, 0) << bound;
    return OwnedUnixSocket::Publish(bound, path_);
  }

  static bool Connects(const std::string& at) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {};
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, at.c_str(), at.size() + 1);
    bool ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
    close(fd);
    return ok;
  }

  // Whether a connection is waiting on listener `fd` (accepts it).
  static bool Accepts(int fd) {
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int c = accept(fd, nullptr, nullptr);
    if (c < 0) return false;
    close(c);
    return true;
  }

  static bool Exists(const std::string& at) {
    struct stat st;
    return lstat(at.c_str(), &st) == 0;
  }

  // Files in the directory other than s.sock (private names left behind).
  int Entries() {
    int n = Exists(path_) ? 1 : 0;
    std::string cmd = absl::StrCat("ls -A ", dir_, " | wc -l");
    FILE* p = popen(cmd.c_str(), "r");
    int all = 0;
    if (fscanf(p, "%d", &all) != 1) all = -1;
    pclose(p);
    return all - n;
  }

  std::string dir_, path_;
  std::vector<int> fds_;
};

TEST_F(UnixSocketTest, PublishesAndRemovesItsOwnFile) {
  int fd;
  auto owned = Listen(&fd);
  ASSERT_TRUE(owned.ok()) << owned.status();
  EXPECT_TRUE(Connects(path_));
  EXPECT_TRUE(Accepts(fd));
  EXPECT_EQ(Entries(), 0);  // the private name is gone
  owned->reset();
  EXPECT_FALSE(Exists(path_));
}

TEST_F(UnixSocketTest, NeverReplacesALiveServer) {
  int first_fd;
  auto first = Listen(&first_fd);
  ASSERT_TRUE(first.ok()) << first.status();
  int second_fd;
  auto second = Listen(&second_fd);
  EXPECT_THAT(second, StatusIs(absl::StatusCode::kAlreadyExists))
      << second.status();
  EXPECT_NE(second.status().message().find("is in use"), std::string::npos);
  EXPECT_EQ(Entries(), 0);  // the loser's private name is gone too
  // The path still reaches the first server.
  EXPECT_TRUE(Connects(path_));
  EXPECT_TRUE(Accepts(first_fd));
}

TEST_F(UnixSocketTest, ReusesAStaleSocket) {
  int dead = BindListen(path_);
  ASSERT_GE(dead, 0);
  close(dead);  // the process "died": the file stays, nobody listens
  fds_.pop_back();
  ASSERT_TRUE(Exists(path_));
  ASSERT_FALSE(Connects(path_));
  int fd;
  auto owned = Listen(&fd);
  ASSERT_TRUE(owned.ok()) << owned.status();
  EXPECT_TRUE(Connects(path_));
  EXPECT_TRUE(Accepts(fd));
}

TEST_F(UnixSocketTest, LeavesOtherFilesAlone) {
  { std::ofstream(path_) << "precious"; }
  int fd;
  auto owned = Listen(&fd);
  EXPECT_THAT(owned, StatusIs(absl::StatusCode::kFailedPrecondition))
      << owned.status();
  std::ifstream in(path_);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");
}

TEST_F(UnixSocketTest, RemovesOnlyAFileThatIsStillItsOwn) {
  int first_fd;
  auto first = Listen(&first_fd);
  ASSERT_TRUE(first.ok()) << first.status();
  // An operator removes the file, and another server takes the path.
  ASSERT_EQ(unlink(path_.c_str()), 0);
  int second_fd;
  auto second = Listen(&second_fd);
  ASSERT_TRUE(second.ok()) << second.status();
  first->reset();  // the first server exits
  EXPECT_TRUE(Exists(path_));
  EXPECT_TRUE(Connects(path_));
  EXPECT_TRUE(Accepts(second_fd));
  second->reset();
  EXPECT_FALSE(Exists(path_));
}

TEST_F(UnixSocketTest, RejectsAPathTooLongForSunPath) {
  std::string bound = PrivateBindPath(path_);
  ASSERT_GE(BindListen(bound), 0);
  auto owned = OwnedUnixSocket::Publish(
      bound, dir_ + "/" + std::string(MaxUnixSocketPath(), 'x'));
  EXPECT_THAT(owned, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_FALSE(Exists(bound));
}

TEST_F(UnixSocketTest, OfManyAtOnceExactlyOneWins) {
  for (int round = 0; round < 100; ++round) {
    constexpr int kListeners = 6;
    std::vector<std::string> bound(kListeners);
    std::vector<int> fd(kListeners);
    for (int i = 0; i < kListeners; ++i) {
      bound[i] = PrivateBindPath(path_);
      fd[i] = BindListen(bound[i]);
      ASSERT_GE(fd[i], 0);
    }
    if (round % 2 == 1) {  // half the rounds start from a stale file
      int dead = BindListen(path_);
      close(dead);
      fds_.pop_back();
    }
    std::vector<absl::StatusOr<std::unique_ptr<OwnedUnixSocket>>> results;
    results.reserve(kListeners);
    for (int i = 0; i < kListeners; ++i) {
      results.emplace_back(absl::UnknownError("not run"));
    }
    std::vector<std::thread> threads;
    threads.reserve(kListeners);
    for (int i = 0; i < kListeners; ++i) {
      threads.emplace_back(
          [&, i] { results[i] = OwnedUnixSocket::Publish(bound[i], path_); });
    }
    for (std::thread& t : threads) t.join();
    int winners = 0, winner = -1;
    for (int i = 0; i < kListeners; ++i) {
      if (results[i].ok()) {
        ++winners;
        winner = i;
      } else {
        EXPECT_THAT(results[i], StatusIs(absl::StatusCode::kAlreadyExists))
            << results[i].status();
      }
    }
    ASSERT_EQ(winners, 1) << "round " << round;
    EXPECT_TRUE(Connects(path_));
    EXPECT_TRUE(Accepts(fd[winner]));
    results.clear();
    EXPECT_FALSE(Exists(path_));
    EXPECT_EQ(Entries(), 0);
  }
}

}  // namespace
}  // namespace blockmeta
