// server/upstream/image_probe.cc — see image_probe.h.
#include "server/upstream/image_probe.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/errno_text.h"

extern char** environ;

namespace blockmeta {
namespace {

// Waits for `pid` (EINTR-safe); its wait status.
int Reap(pid_t pid) {
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return st;
}

// The largest unsigned number following `"key"` and a colon; 0 if none.
uint64_t MaxNumberAfterKey(std::string_view json, std::string_view key) {
  const std::string quoted =
      absl::StrCat("\"", absl::string_view(key.data(), key.size()), "\"");
  uint64_t best = 0;
  for (size_t pos = json.find(quoted); pos != std::string_view::npos;
       pos = json.find(quoted, pos + 1)) {
    size_t i = pos + quoted.size();
    while (i < json.size() && absl::ascii_isspace(json[i])) ++i;
    if (i >= json.size() || json[i] != ':') continue;
    ++i;
    while (i < json.size() && absl::ascii_isspace(json[i])) ++i;
    uint64_t v = 0;
    bool any = false;
    while (i < json.size() && absl::ascii_isdigit(json[i])) {
      const uint64_t d = static_cast<uint64_t>(json[i] - '0');
      if (v > (UINT64_MAX - d) / 10) {
        v = UINT64_MAX;  // saturate: coarser is always safe
      } else {
        v = v * 10 + d;
      }
      any = true;
      ++i;
    }
    if (any) best = std::max(best, v);
  }
  return best;
}

}  // namespace

absl::StatusOr<std::string> RunBounded(const std::vector<std::string>& argv,
                                       absl::Time deadline, size_t max_output) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) {
    return absl::UnavailableError(absl::StrCat("pipe: ", ErrnoText(errno)));
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, p[1], 1);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(p[1]);
  if (rc != 0) {
    close(p[0]);
    return absl::UnavailableError(
        absl::StrCat("cannot run ", argv[0], ": ", ErrnoText(rc)));
  }
  std::string out;
  absl::Status failed;
  char buf[16384];
  for (;;) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) {
      failed = absl::DeadlineExceededError(
          absl::StrCat(argv[0], " did not finish in time"));
      break;
    }
    struct pollfd pfd = {p[0], POLLIN, 0};
    const int r =
        poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ms, 1 << 30)));
    if (r < 0 && errno != EINTR) {
      failed = absl::UnavailableError(absl::StrCat("poll: ", ErrnoText(errno)));
      break;
    }
    if (r <= 0) continue;
    const ssize_t n = read(p[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF (or an error): the child closed stdout
    if (out.size() + static_cast<size_t>(n) > max_output) {
      failed = absl::ResourceExhaustedError(
          absl::StrCat(argv[0], " wrote more than ", max_output, " bytes"));
      break;
    }
    out.append(buf, static_cast<size_t>(n));
  }
  close(p[0]);
  if (!failed.ok()) kill(pid, SIGKILL);
  const int st = Reap(pid);
  if (!failed.ok()) return failed;
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    return absl::UnavailableError(
        absl::StrCat(argv[0], " failed (wait status ", st, ")"));
  }
  return out;
}

absl::StatusOr<ImageGranularity> ParseQemuImgInfo(std::string_view json) {
  ImageGranularity g;
  g.cluster_size = MaxNumberAfterKey(json, "cluster-size");
  g.bitmap_granularity = MaxNumberAfterKey(json, "granularity");
  if (g.cluster_size == 0) {
    return absl::InvalidArgumentError("qemu-img info: no cluster-size");
  }
  return g;
}

absl::StatusOr<ImageGranularity> ProbeQcow2Granularity(
    const std::string& path, absl::Duration timeout,
    const std::string& qemu_img) {
  // --force-share: the image may be open (locked) by a qemu-nbd already.
  absl::StatusOr<std::string> out =
      RunBounded({qemu_img, "info", "--output=json", "--force-share", "-f",
                  "qcow2", "--", path},
                 absl::Now() + timeout, 1 << 20);
  if (!out.ok()) return out.status();
  return ParseQemuImgInfo(*out);
}

}  // namespace blockmeta
