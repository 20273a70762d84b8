// server/common/startup_resources.cc — see startup_resources.h.
#include "server/common/startup_resources.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace {

std::string Limit(int resource) {
  struct rlimit rl;
  if (getrlimit(resource, &rl) != 0) return "unknown";
  auto text = [](rlim_t v) {
    return v == RLIM_INFINITY ? std::string("unlimited") : absl::StrCat(v);
  };
  return absl::StrCat(text(rl.rlim_cur), " (hard ", text(rl.rlim_max), ")");
}

absl::Status CheckFds(int n) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &rl);  // best effort
  }
  std::vector<int> fds;
  int err = 0;
  for (int i = 0; i < n; ++i) {
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      err = errno;
      break;
    }
    fds.push_back(fd);
  }
  for (int fd : fds) close(fd);
  if (err == 0) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "cannot open ", n, " file descriptors (opened ", fds.size(),
      "): ", ErrnoText(err), "; RLIMIT_NOFILE is ", Limit(RLIMIT_NOFILE),
      ": raise it (ulimit -n, LimitNOFILE=, the container's nofile)"));
}

absl::Status CheckThreads(int n) {
  absl::Notification release;
  std::vector<std::thread> threads;
  threads.reserve(n);
  std::string error;
  for (int i = 0; i < n; ++i) {
    try {
      threads.emplace_back([&release] { release.WaitForNotification(); });
    } catch (const std::system_error& e) {
      error = e.what();
      break;
    }
  }
  release.Notify();
  const size_t started = threads.size();
  for (std::thread& t : threads) t.join();
  if (error.empty()) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "cannot start ", n, " threads (started ", started, "): ", error,
      "; no free pids or threads, or no address space for their stacks: "
      "check the cgroup's pids.max, RLIMIT_NPROC (ulimit -u) ",
      Limit(RLIMIT_NPROC), ", kernel.threads-max, and RLIMIT_AS ",
      Limit(RLIMIT_AS)));
}

// Reserves `bytes` of address space (held by the caller while the threads
// are started, so the two add up as they will in the running server).
absl::StatusOr<void*> ReserveMemory(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p != MAP_FAILED) return p;
  int err = errno;
  return absl::ResourceExhaustedError(absl::StrCat(
      "cannot reserve ", bytes >> 20, " MiB of address space: ", ErrnoText(err),
      "; RLIMIT_AS (ulimit -v) is ", Limit(RLIMIT_AS), ": raise it"));
}

}  // namespace

absl::Status CheckStartupResources(const StartupNeeds& needs) {
  if (absl::Status s = CheckFds(needs.fds); !s.ok()) return s;
  absl::StatusOr<void*> memory = ReserveMemory(needs.memory_bytes);
  if (!memory.ok()) return memory.status();
  absl::Status s = CheckThreads(needs.threads);
  munmap(*memory, needs.memory_bytes);
  return s;
}

}  // namespace blockmeta
