// tests/testing/nbd_process.cc — see nbd_process.h.
#include "tests/testing/nbd_process.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/errno_text.h"

namespace blockmeta::testing {
namespace {

constexpr size_t kMaxSocketDirLen = 80;  // leaves room in sun_path (108)

std::string BaseTempDir() {
  for (const char* var : {"TEST_TMPDIR", "TMPDIR"}) {
    // Test binaries only read the environment; none calls setenv while
    // another thread may make a TempDir.
    const char* v = getenv(var);  // NOLINT(concurrency-mt-unsafe)
    if (v != nullptr && *v != '\0' && strlen(v) < kMaxSocketDirLen - 20) {
      return v;
    }
  }
  return "/tmp";
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Tail(const std::string& s, size_t n = 2000) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

// fork + exec in a new process group. stdin is /dev/null; stdout/stderr go
// to the given fds (-1: /dev/null). Everything after fork() is
// async-signal-safe.
absl::StatusOr<pid_t> ForkExec(const std::vector<std::string>& argv, int out_fd,
                               int err_fd) {
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  std::vector<char*> cargv;
  cargv.reserve(argv.size() + 1);
  for (const std::string& a : argv)
    cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) {
    return absl::InternalError(absl::StrCat("fork: ", ErrnoText(errno)));
  }
  if (pid == 0) {
    setpgid(0, 0);
    int devnull = open("/dev/null", O_RDWR);
    dup2(devnull, 0);
    dup2(out_fd >= 0 ? out_fd : devnull, 1);
    dup2(err_fd >= 0 ? err_fd : devnull, 2);
    // Close everything else (test harness fds, other servers' sockets).
    for (int fd = 3; fd < 1024; ++fd) close(fd);
    signal(SIGPIPE, SIG_DFL);
    execvp(cargv[0], cargv.data());
    const char msg[] = "exec failed: ";
    (void)!write(2, msg, sizeof msg - 1);
    (void)!write(2, cargv[0], strlen(cargv[0]));
    (void)!write(2, "\n", 1);
    _exit(127);
  }
  setpgid(pid, pid);  // also from the parent, to avoid racing the child
  return pid;
}

std::string DescribeWait(int wstatus) {
  if (WIFEXITED(wstatus))
    return absl::StrCat("exit status ", WEXITSTATUS(wstatus));
  if (WIFSIGNALED(wstatus))
    return absl::StrCat("killed by signal ", WTERMSIG(wstatus));
  return "stopped";
}

void KillGroupAndReap(pid_t pid) {
  if (pid <= 0) return;
  kill(-pid, SIGKILL);
  kill(pid, SIGKILL);
  int st;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
}

bool SocketAccepts(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return ok;
}

}  // namespace

TempDir::TempDir() {
  std::string tmpl = BaseTempDir() + "/bmtXXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    fprintf(stderr, "mkdtemp(%s): %s\n", tmpl.c_str(),
            ErrnoText(errno).c_str());
    abort();
  }
  path_ = buf.data();
}

TempDir::~TempDir() { (void)RunCommand({"rm", "-rf", "--", path_}); }

std::string TempDir::File(const std::string& name) const {
  return path_ + "/" + name;
}

absl::StatusOr<std::unique_ptr<NbdProcess>> NbdProcess::Start(
    std::vector<std::string> argv, absl::Duration timeout) {
  std::unique_ptr<NbdProcess> p(new NbdProcess());
  p->dir_ = std::make_unique<TempDir>();
  p->socket_path_ = p->dir_->File("nbd.sock");
  p->log_path_ = p->dir_->File("server.log");
  p->timeout_ = timeout;
  for (std::string& a : argv) {
    a = absl::StrReplaceAll(a, {{"{sock}", p->socket_path_}});
  }
  p->argv_ = std::move(argv);
  absl::Status s = p->Spawn();
  if (!s.ok()) return s;
  return p;
}

absl::Status NbdProcess::Spawn() {
  unlink(socket_path_.c_str());
  int log_fd =
      open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return absl::InternalError(
        absl::StrCat("open ", log_path_, ": ", ErrnoText(errno)));
  }
  absl::StatusOr<pid_t> pid = ForkExec(argv_, log_fd, log_fd);
  close(log_fd);
  if (!pid.ok()) return pid.status();
  pid_ = *pid;
  const absl::Time deadline = absl::Now() + timeout_;
  while (true) {
    int st;
    pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return absl::InternalError(
          absl::StrCat("NBD server [", absl::StrJoin(argv_, " "), "] exited (",
                       DescribeWait(st), ") before serving: ", Tail(Log())));
    }
    if (SocketAccepts(socket_path_)) return absl::OkStatus();
    if (absl::Now() > deadline) {
      Kill();
      return absl::DeadlineExceededError(
          absl::StrCat("NBD server [", absl::StrJoin(argv_, " "),
                       "] did not listen on ", socket_path_, " within ",
                       absl::FormatDuration(timeout_), ": ", Tail(Log())));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
}

NbdProcess::~NbdProcess() { Kill(); }

std::string NbdProcess::uri(const std::string& export_name) const {
  return absl::StrCat("nbd+unix:///", export_name, "?socket=", socket_path_);
}

std::string NbdProcess::Log() const { return ReadFileOrEmpty(log_path_); }

void NbdProcess::Kill() {
  KillGroupAndReap(pid_);
  pid_ = -1;
}

absl::Status NbdProcess::Restart() {
  Kill();
  return Spawn();
}

absl::StatusOr<std::string> RunCommand(const std::vector<std::string>& argv,
                                       absl::Duration timeout) {
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe");
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return absl::InternalError("pipe");
  }
  absl::StatusOr<pid_t> pid = ForkExec(argv, out[1], err[1]);
  close(out[1]);
  close(err[1]);
  if (!pid.ok()) {
    close(out[0]);
    close(err[0]);
    return pid.status();
  }
  std::string sout, serr;
  const absl::Time deadline = absl::Now() + timeout;
  bool timed_out = false;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  while (open_fds > 0) {
    int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) {
      timed_out = true;
      break;
    }
    int r = poll(fds, 2, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (r < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[65536];
      ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? sout : serr).append(buf, n);
      } else if (n == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (pollfd& p : fds) {
    if (p.fd >= 0) close(p.fd);
  }
  if (timed_out) {
    KillGroupAndReap(*pid);
    return absl::DeadlineExceededError(
        absl::StrCat("[", absl::StrJoin(argv, " "), "] timed out after ",
                     absl::FormatDuration(timeout), "; stderr: ", Tail(serr)));
  }
  int st = 0;
  while (waitpid(*pid, &st, 0) < 0 && errno == EINTR) {
  }
  kill(-*pid, SIGKILL);  // leftovers of the group, if any
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    return absl::InternalError(absl::StrCat("[", absl::StrJoin(argv, " "),
                                            "] failed (", DescribeWait(st),
                                            "); stderr: ", Tail(serr)));
  }
  return sout;
}

absl::Status QemuIo(const std::string& path, const std::string& format,
                    const std::vector<std::string>& qemu_io_cmds) {
  if (qemu_io_cmds.empty()) return absl::OkStatus();
  std::vector<std::string> argv = {"qemu-io", "-f", format};
  for (const std::string& c : qemu_io_cmds) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(path);
  absl::StatusOr<std::string> out = RunCommand(argv);
  if (!out.ok()) return out.status();
  // qemu-io reports command failures on stdout and still exits 0.
  for (const char* bad : {"error", "failed", "Error", "invalid"}) {
    if (out->find(bad) != std::string::npos) {
      return absl::InternalError(absl::StrCat("qemu-io on ", path, ": ", *out));
    }
  }
  return absl::OkStatus();
}

absl::Status MakeImage(const std::string& path, const std::string& format,
                       uint64_t size,
                       const std::vector<std::string>& qemu_io_cmds) {
  absl::StatusOr<std::string> out = RunCommand(
      {"qemu-img", "create", "-q", "-f", format, path, absl::StrCat(size)});
  if (!out.ok()) return out.status();
  return QemuIo(path, format, qemu_io_cmds);
}

}  // namespace blockmeta::testing
