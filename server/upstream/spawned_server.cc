// server/upstream/spawned_server.cc — see spawned_server.h.
#include "server/upstream/spawned_server.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/errno_text.h"
#include "server/common/log.h"

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

std::string SpawnBase() {
  // blockmetad never sets the environment, so no call races a setenv.
  // NOLINTNEXTLINE(concurrency-mt-unsafe)
  const char* base = getenv("TMPDIR");
  return (base != nullptr && *base != '\0' && strlen(base) < 60) ? base
                                                                 : "/tmp";
}

// Field 22 of /proc/PID/stat (start time in clock ticks), "" if gone.
std::string StartTime(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(in, line)) return "";
  size_t paren = line.rfind(')');
  if (paren == std::string::npos) return "";
  std::istringstream fields(line.substr(paren + 2));
  std::string f;
  // Fields after the command start at 3 (state); 22 is the 20th of them.
  for (int i = 3; i <= 22 && (fields >> f); ++i) {
  }
  return f;
}

std::string OwnerStamp() {
  return absl::StrCat(getpid(), " ", StartTime(getpid()));
}

// Reads "PID START" from `path`; false if absent or malformed.
bool ReadStamp(const std::string& path, int* pid, std::string* start) {
  std::ifstream in(path);
  std::string pid_text;
  if (!(in >> pid_text >> *start)) return false;
  return absl::SimpleAtoi(pid_text, pid) && *pid > 0;
}

// How long a new blockmetad waits for a server its dead predecessor
// spawned to finish exiting (the parent-death SIGTERM makes qemu-nbd close
// its bitmaps cleanly and release the image lock, usually within
// milliseconds), before sending SIGTERM again, and before SIGKILL.
constexpr absl::Duration kStaleServerTermAgain = absl::Seconds(10);
constexpr absl::Duration kStaleServerKill = absl::Seconds(30);

// True while `pid` is the process that started at `start` and has not
// exited (a zombie waiting for its new parent to reap it has exited).
bool StillRuns(int pid, const std::string& start) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return false;
  const char state = line[paren + 2];
  return state != 'Z' && state != 'X' && StartTime(pid) == start;
}

// Waits until the process `pid` that started at `start` is gone (see
// above). Returns false if it had to be killed.
bool AwaitStaleServer(int pid, const std::string& start) {
  const absl::Time t0 = absl::Now();
  bool termed_again = false;
  while (StillRuns(pid, start)) {
    const absl::Duration waited = absl::Now() - t0;
    if (waited >= kStaleServerKill) {
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
      LogError("stale_spawned_server_killed",
               {{"pid", static_cast<int64_t>(pid)},
                {"reason",
                 "still running 30 s after the blockmetad that spawned it "
                 "died; its qcow2 bitmaps may be left inconsistent"}});
      return false;
    }
    if (!termed_again && waited >= kStaleServerTermAgain) {
      termed_again = true;
      kill(-pid, SIGTERM);
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

// The last lines of a server's stderr that say a qcow2 bitmap is unusable
// ("qemu-nbd: Bitmap 'b0' is inconsistent and cannot be used"), else "".
std::string InconsistentBitmapLine(const std::string& tail) {
  size_t at = tail.find("is inconsistent");
  if (at == std::string::npos) return "";
  size_t begin = tail.rfind('\n', at);
  begin = begin == std::string::npos ? 0 : begin + 1;
  size_t end = tail.find('\n', at);
  return tail.substr(begin, end == std::string::npos ? end : end - begin);
}

// Runs closures on one thread that lives as long as the process, so the
// parent-death signal of the children it forks fires only when the process
// dies (prctl(2): "the parent" is the forking thread).
class Spawner {
 public:
  static Spawner& Get() {
    static Spawner* s = new Spawner();  // never destroyed, never joined
    return *s;
  }
  void Run(const std::function<void()>& fn) {
    if (std::this_thread::get_id() == id_) {
      fn();
      return;
    }
    sync::MutexLock lock(&mu_);
    const uint64_t ticket = ++queued_;
    queue_.push_back(&fn);
    cv_.Signal();
    while (done_ < ticket)
      mu_.WaitWithDeadline(&done_cv_, absl::InfiniteFuture());
  }

 private:
  Spawner() {
    std::thread t([this] { Loop(); });
    id_ = t.get_id();
    t.detach();
  }
  void Loop() {
    for (;;) {
      const std::function<void()>* fn;
      {
        sync::MutexLock lock(&mu_);
        while (queue_.empty())
          mu_.WaitWithDeadline(&cv_, absl::InfiniteFuture());
        fn = queue_.front();
        queue_.pop_front();
      }
      (*fn)();
      sync::MutexLock lock(&mu_);
      ++done_;
      done_cv_.SignalAll();
    }
  }

  std::thread::id id_;
  sync::Mutex mu_;
  absl::CondVar cv_, done_cv_;
  std::deque<const std::function<void()>*> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t done_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

int CleanStaleSpawnDirs() {
  const std::string base = SpawnBase();
  std::error_code ec;
  std::filesystem::directory_iterator it(base, ec), end;
  int removed = 0;
  // Entries removed below do not disturb the iteration (readdir semantics).
  for (; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    absl::string_view n = name;
    if (n.substr(0, 10) != "blockmeta-") continue;
    const std::string dir = absl::StrCat(base, "/", n);
    int pid = 0;
    std::string start;
    // Not ours, or being made.
    if (!ReadStamp(dir + "/owner", &pid, &start)) continue;
    if (StartTime(pid) == start) continue;  // the owner still runs
    // Its server may still be exiting (closing bitmaps, holding the image
    // lock): a new one on the same image must not start before it is gone.
    int server_pid = 0;
    std::string server_start;
    if (ReadStamp(dir + "/server", &server_pid, &server_start)) {
      AwaitStaleServer(server_pid, server_start);
    }
    for (const char* f : {"/nbd.sock", "/server.log", "/owner", "/server"}) {
      unlink((dir + f).c_str());
    }
    if (rmdir(dir.c_str()) == 0) ++removed;
  }
  return removed;
}

absl::StatusOr<std::unique_ptr<SpawnedServer>> SpawnedServer::Create(
    std::vector<std::string> argv, std::string name) {
  if (argv.empty() || argv[0].empty()) {
    return absl::InvalidArgumentError("empty server command");
  }
  std::string tmpl = absl::StrCat(SpawnBase(), "/blockmeta-XXXXXX");
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("mkdtemp ", tmpl, ": ", ErrnoText(errno)));
  }
  std::unique_ptr<SpawnedServer> s(new SpawnedServer());
  s->argv_ = std::move(argv);
  s->name_ = std::move(name);
  s->dir_ = buf.data();
  s->socket_path_ = s->dir_ + "/nbd.sock";
  s->log_path_ = s->dir_ + "/server.log";
  {
    std::ofstream owner(s->dir_ + "/owner");
    owner << OwnerStamp() << "\n";
  }
  return s;
}

SpawnedServer::~SpawnedServer() {
  Stop();
  unlink(socket_path_.c_str());
  unlink(log_path_.c_str());
  unlink((dir_ + "/owner").c_str());
  unlink((dir_ + "/server").c_str());
  rmdir(dir_.c_str());
}

absl::Status SpawnedServer::Start() {
  Stop();
  sync::MutexLock lock(&mu_);
  exit_description_.clear();
  unlink(socket_path_.c_str());
  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0)
    return absl::InternalError(absl::StrCat("socket: ", ErrnoText(errno)));
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
        absl::StrCat("listen on ", socket_path_, ": ", ErrnoText(err)));
  }
  int log_fd =
      open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  // exec(2) closes the write end (CLOEXEC): EOF means the exec succeeded,
  // four bytes are the child's errno when it failed.
  int exec_pipe[2] = {-1, -1};
  if (pipe2(exec_pipe, O_CLOEXEC) != 0) {
    int err = errno;
    close(lfd);
    if (log_fd >= 0) close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return absl::InternalError(absl::StrCat("pipe: ", ErrnoText(err)));
  }
  const int exec_w = exec_pipe[1];

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
  cenv.reserve(env.size() + 2);
  for (std::string& e : env) cenv.push_back(e.data());
  char listen_pid[40] = "LISTEN_PID=";
  cenv.push_back(listen_pid);
  cenv.push_back(nullptr);
  std::vector<char*> cargv;
  for (std::string& a : argv_) cargv.push_back(a.data());
  cargv.push_back(nullptr);

  const pid_t parent = getpid();
  pid_t pid = -1;
  int fork_errno = 0;
  Spawner::Get().Run([&] {
    pid = fork();
    fork_errno = errno;
    if (pid != 0) return;
    // The child. Told to stop when blockmetad dies, whatever kills it:
    // SIGTERM, so qemu-nbd closes its qcow2 bitmaps cleanly (SIGKILL left
    // them marked in use: "Bitmap 'b0' is inconsistent" at the next
    // start). If blockmetad died between fork and prctl, give up now.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(126);
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
    // The exec pipe at fd 4, still close-on-exec (exec_w > 3: fds 0-3 were
    // taken before the pipe was made).
    if (exec_w != 4) dup3(exec_w, 4, O_CLOEXEC);
    for (int fd = 5; fd < 1024; ++fd) close(fd);
    sigset_t all;
    sigemptyset(&all);
    pthread_sigmask(SIG_SETMASK, &all, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGPIPE, &dfl, nullptr);
    execvpe(cargv[0], cargv.data(), cenv.data());
    const int exec_errno = errno;
    (void)!write(4, &exec_errno, sizeof exec_errno);
    const char msg[] = "blockmeta: exec failed: ";
    (void)!write(2, msg, sizeof msg - 1);
    (void)!write(2, cargv[0], strlen(cargv[0]));
    (void)!write(2, "\n", 1);
    _exit(127);
  });
  close(exec_w);
  if (pid < 0) {
    int err = fork_errno;
    close(exec_pipe[0]);
    close(lfd);
    if (log_fd >= 0) close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return absl::InternalError(absl::StrCat("fork: ", ErrnoText(err)));
  }
  setpgid(pid, pid);
  close(lfd);  // the server owns the listening socket now
  if (log_fd >= 0) close(log_fd);
  if (null_fd >= 0) close(null_fd);
  pid_ = pid;
  started_ = absl::Now();
  {
    std::ofstream stamp(dir_ + "/server");
    stamp << pid << " " << StartTime(pid) << "\n";
  }
  // Blocks only until the child has exec'd (or failed to).
  int exec_errno = 0;
  ssize_t got;
  while ((got = read(exec_pipe[0], &exec_errno, sizeof exec_errno)) < 0 &&
         errno == EINTR) {
  }
  close(exec_pipe[0]);
  if (got == static_cast<ssize_t>(sizeof exec_errno)) {
    int st = 0;
    while (waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    ReapLocked(st);
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot run ", argv_[0].substr(0, 256), ": ", ErrnoText(exec_errno)));
  }
  return absl::OkStatus();
}

void SpawnedServer::ReapLocked(int wstatus) {
  mu_.AssertHeld();
  const std::string tail = LogTail();
  const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - started_);
  exit_description_ =
      absl::StrCat(Describe(wstatus), " ", ms, " ms after start: ", tail);
  pid_ = -1;
  const std::string bitmap = InconsistentBitmapLine(tail);
  if (!bitmap.empty()) {
    inconsistent_bitmap_exits_.fetch_add(1, std::memory_order_relaxed);
    exit_description_ = absl::StrCat(
        "found a qcow2 dirty bitmap inconsistent (marked in use: its server "
        "was killed without closing it); it no longer proves what changed, "
        "so it cannot serve incremental backups: remove it (qemu-img bitmap "
        "--remove), take a full backup and add a new one. The server ",
        exit_description_);
    LogError("upstream_bitmap_inconsistent",
             {{"export", name_}, {"server", bitmap}});
  }
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
