// server/upstream/spawned_server.cc — see spawned_server.h.
#include "server/upstream/spawned_server.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

extern char** environ;

namespace blockmeta {
namespace {

// Writes the decimal form of v into buf (async-signal-safe).
void FormatPid(pid_t v, char* buf) {
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v > 0);
  while (n > 0) *buf++ = tmp[--n];
  *buf = '\0';
}

std::string Describe(int wstatus) {
  if (WIFEXITED(wstatus)) {
    return absl::StrCat("exited with status ", WEXITSTATUS(wstatus));
  }
  if (WIFSIGNALED(wstatus)) {
    return absl::StrCat("killed by signal ", WTERMSIG(wstatus));
  }
  return "stopped";
}

}  // namespace

absl::StatusOr<std::unique_ptr<SpawnedServer>> SpawnedServer::Create(
    std::vector<std::string> argv) {
  if (argv.empty() || argv[0].empty()) {
    return absl::InvalidArgumentError("empty server command");
  }
  const char* base = getenv("TMPDIR");
  std::string tmpl = absl::StrCat(
      (base != nullptr && *base != '\0' && strlen(base) < 60) ? base : "/tmp",
      "/blockmeta-XXXXXX");
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("mkdtemp ", tmpl, ": ", strerror(errno)));
  }
  std::unique_ptr<SpawnedServer> s(new SpawnedServer());
  s->argv_ = std::move(argv);
  s->dir_ = buf.data();
  s->socket_path_ = s->dir_ + "/nbd.sock";
  s->log_path_ = s->dir_ + "/server.log";
  return s;
}

SpawnedServer::~SpawnedServer() {
  Stop();
  unlink(socket_path_.c_str());
  unlink(log_path_.c_str());
  rmdir(dir_.c_str());
}

absl::Status SpawnedServer::Start() {
  Stop();
  sync::MutexLock lock(&mu_);
  exit_description_.clear();
  unlink(socket_path_.c_str());
  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0)
    return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path_.size() >= sizeof(addr.sun_path)) {
    close(lfd);
    return absl::InternalError("socket path too long: " + socket_path_);
  }
  memcpy(addr.sun_path, socket_path_.c_str(), socket_path_.size() + 1);
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      listen(lfd, 64) != 0) {
    int err = errno;
    close(lfd);
    return absl::InternalError(
        absl::StrCat("listen on ", socket_path_, ": ", strerror(err)));
  }
  int log_fd =
      open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);

  // Everything the child needs is prepared before fork().
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    absl::string_view v(*e);
    if (v.substr(0, 7) == "LISTEN_") continue;
    env.emplace_back(v);
  }
  env.push_back("LISTEN_FDS=1");
  env.push_back("LISTEN_FDNAMES=nbd");
  std::vector<char*> cenv;
  for (std::string& e : env) cenv.push_back(e.data());
  char listen_pid[40] = "LISTEN_PID=";
  cenv.push_back(listen_pid);
  cenv.push_back(nullptr);
  std::vector<char*> cargv;
  for (std::string& a : argv_) cargv.push_back(a.data());
  cargv.push_back(nullptr);

  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(lfd);
    if (log_fd >= 0) close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return absl::InternalError(absl::StrCat("fork: ", strerror(err)));
  }
  if (pid == 0) {
    setpgid(0, 0);
    FormatPid(getpid(), listen_pid + strlen("LISTEN_PID="));
    if (null_fd >= 0) {
      dup2(null_fd, 0);
      dup2(null_fd, 1);
    }
    if (log_fd >= 0) dup2(log_fd, 2);
    if (lfd == 3) {
      fcntl(3, F_SETFD, 0);
    } else {
      dup2(lfd, 3);  // dup2 clears FD_CLOEXEC on the new fd
    }
    for (int fd = 4; fd < 1024; ++fd) close(fd);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, nullptr);
    signal(SIGPIPE, SIG_DFL);
    execvpe(cargv[0], cargv.data(), cenv.data());
    const char msg[] = "blockmeta: exec failed: ";
    (void)!write(2, msg, sizeof msg - 1);
    (void)!write(2, cargv[0], strlen(cargv[0]));
    (void)!write(2, "\n", 1);
    _exit(127);
  }
  setpgid(pid, pid);
  close(lfd);  // the server owns the listening socket now
  if (log_fd >= 0) close(log_fd);
  if (null_fd >= 0) close(null_fd);
  pid_ = pid;
  return absl::OkStatus();
}

void SpawnedServer::ReapLocked(int wstatus) {
  exit_description_ = absl::StrCat(Describe(wstatus), ": ", LogTail());
  pid_ = -1;
}

bool SpawnedServer::Running() {
  sync::MutexLock lock(&mu_);
  if (pid_ <= 0) return false;
  int st = 0;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    ReapLocked(st);
    return false;
  }
  return true;
}

void SpawnedServer::Stop(absl::Duration grace) {
  sync::MutexLock lock(&mu_);
  if (pid_ <= 0) return;
  kill(-pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + grace;
  int st = 0;
  while (true) {
    pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) break;
    if (absl::Now() >= deadline) {
      kill(-pid_, SIGKILL);
      while (waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  kill(-pid_, SIGKILL);  // stragglers in the group (e.g. plugin helpers)
  ReapLocked(st);
}

pid_t SpawnedServer::pid() const {
  sync::MutexLock lock(&mu_);
  return pid_;
}

std::string SpawnedServer::ExitDescription() const {
  sync::MutexLock lock(&mu_);
  return exit_description_;
}

std::string SpawnedServer::LogTail() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  if (s.size() > 1000) s = "..." + s.substr(s.size() - 1000);
  return s.empty() ? "(no output)" : s;
}

}  // namespace blockmeta
