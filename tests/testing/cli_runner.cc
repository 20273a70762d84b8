// tests/testing/cli_runner.cc — see cli_runner.h.
#include "tests/testing/cli_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/time/clock.h"

extern char** environ;

namespace blockmeta::testing {

std::string RunfilePath(const std::string& workspace_relative) {
  // Bazel sets these before the test starts; test binaries only read the
  // environment, so no setenv can race these reads.
  const char* srcdir =
      std::getenv("TEST_SRCDIR");  // NOLINT(concurrency-mt-unsafe)
  const char* ws =
      std::getenv("TEST_WORKSPACE");  // NOLINT(concurrency-mt-unsafe)
  return std::string(srcdir != nullptr ? srcdir : ".") + "/" +
         (ws != nullptr ? ws : "blockmeta") + "/" + workspace_relative;
}

RunResult RunProgram(const std::vector<std::string>& argv,
                     const RunOptions& options) {
  RunResult result;
  // Prepare everything the child needs before fork.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string entry = *e;
    bool drop = false;
    for (const std::string& name : options.unset_env) {
      if (absl::StartsWith(entry, name + "=")) drop = true;
    }
    for (const std::string& add : options.env) {
      if (absl::StartsWith(entry, add.substr(0, add.find('=') + 1))) {
        drop = true;
      }
    }
    if (!drop) env_strings.push_back(entry);
  }
  for (const std::string& add : options.env) env_strings.push_back(add);
  std::vector<char*> envp, args;
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (std::string& s : argv_copy) args.push_back(s.data());
  args.push_back(nullptr);

  int out_pipe[2], err_pipe[2] = {-1, -1};
  int pty_master = -1, pty_slave = -1;
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return result;
  if (options.stderr_tty) {
    if (openpty(&pty_master, &pty_slave, nullptr, nullptr, nullptr) != 0) {
      return result;
    }
    fcntl(pty_master, F_SETFD, FD_CLOEXEC);
    fcntl(pty_slave, F_SETFD, FD_CLOEXEC);
  } else if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    return result;
  }
  absl::Time start = absl::Now();
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    int devnull = open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(out_pipe[1], 1);
    dup2(options.stderr_tty ? pty_slave : err_pipe[1], 2);
    execve(args[0], args.data(), envp.data());
    const char msg[] = "exec failed\n";
    (void)!write(2, msg, sizeof(msg) - 1);
    _exit(127);
  }
  close(out_pipe[1]);
  int err_fd;
  if (options.stderr_tty) {
    close(pty_slave);
    err_fd = pty_master;
  } else {
    close(err_pipe[1]);
    err_fd = err_pipe[0];
  }
  absl::Time deadline = start + options.timeout;
  bool out_open = true, err_open = true;
  char buf[65536];
  while (out_open || err_open) {
    pollfd fds[2];
    int n = 0;
    if (out_open) fds[n++] = {out_pipe[0], POLLIN, 0};
    if (err_open) fds[n++] = {err_fd, POLLIN, 0};
    int wait_ms =
        static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (wait_ms <= 0) {
      result.timed_out = true;
      kill(-pid, SIGKILL);
      break;
    }
    int r = poll(fds, n, wait_ms);
    if (r < 0 && errno == EINTR) continue;
    for (int i = 0; i < n; ++i) {
      if (fds[i].revents == 0) continue;
      ssize_t got = read(fds[i].fd, buf, sizeof(buf));
      bool is_out = fds[i].fd == out_pipe[0];
      if (got <= 0) {
        // A pty master reads EIO once the slave side is closed.
        (is_out ? out_open : err_open) = false;
      } else {
        (is_out ? result.out : result.err).append(buf, got);
      }
    }
  }
  close(out_pipe[0]);
  close(err_fd);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.elapsed = absl::Now() - start;
  if (WIFEXITED(status) && !result.timed_out) {
    result.exit_code = WEXITSTATUS(status);
  }
  return result;
}

}  // namespace blockmeta::testing
