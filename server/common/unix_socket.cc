// server/common/unix_socket.cc — see unix_socket.h.
#include "server/common/unix_socket.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace {

std::string DirOf(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::Status ErrnoStatus(int err, const std::string& what) {
  std::string msg = absl::StrCat(what, ": ", ErrnoText(err));
  switch (err) {
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case ENAMETOOLONG:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::UnavailableError(msg);
  }
}

// An exclusive flock on a directory, held for the object's life. Every
// blockmetad publishing or removing a socket in that directory takes it, so
// "probe, remove if stale, link" is one step for them.
class DirLock {
 public:
  static absl::StatusOr<DirLock> Take(const std::string& dir) {
    int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      return ErrnoStatus(errno, absl::StrCat("cannot open directory \"", dir,
                                             "\" of a Unix socket"));
    }
    while (flock(fd, LOCK_EX) != 0) {
      if (errno != EINTR) {
        int err = errno;
        close(fd);
        return ErrnoStatus(err, absl::StrCat("cannot lock directory \"", dir,
                                             "\" of a Unix socket"));
      }
    }
    return DirLock(fd);
  }
  DirLock(DirLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  DirLock& operator=(DirLock&&) = delete;
  ~DirLock() {
    if (fd_ >= 0) close(fd_);  // releases the lock
  }

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

enum class Probe { kAbsent, kLive, kStale };

// What is at `path`: nothing, a socket some process accepts on, or a socket
// nobody listens on. An error for anything else.
absl::StatusOr<Probe> ProbeSocketFile(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Probe::kAbsent;
    return ErrnoStatus(errno, absl::StrCat("cannot stat \"", path, "\""));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "\"", path, "\" exists and is not a socket; not replacing it"));
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket");
  struct sockaddr_un sa = {};
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, path.c_str(), path.size() + 1);  // length checked
  int rc = connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa);
  int err = errno;
  close(fd);
  if (rc == 0) return Probe::kLive;
  switch (err) {
    case EAGAIN:       // a full backlog: somebody listens
    case EINPROGRESS:  // not on Linux for AF_UNIX, but live if so
      return Probe::kLive;
    case ECONNREFUSED:  // nobody listens: left by a process that ended
      return Probe::kStale;
    case ENOENT:
      return Probe::kAbsent;
    default:
      return ErrnoStatus(err, absl::StrCat("cannot probe Unix socket \"", path,
                                           "\" for a live server"));
  }
}

// link(bound, path), replacing only a stale socket. Called under DirLock.
absl::Status LinkNoReplace(const std::string& bound, const std::string& path) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    if (link(bound.c_str(), path.c_str()) == 0) return absl::OkStatus();
    if (errno != EEXIST) {
      return ErrnoStatus(
          errno, absl::StrCat("cannot create Unix socket \"", path, "\""));
    }
    absl::StatusOr<Probe> p = ProbeSocketFile(path);
    if (!p.ok()) return p.status();
    switch (*p) {
      case Probe::kLive:
        return absl::AlreadyExistsError(absl::StrCat(
            "Unix socket \"", path,
            "\" is in use: a server accepts connections there (another "
            "blockmetad on the same address?); not replacing it"));
      case Probe::kStale:
        if (unlink(path.c_str()) != 0 && errno != ENOENT) {
          return ErrnoStatus(errno, absl::StrCat("cannot remove stale Unix "
                                                 "socket \"",
                                                 path, "\""));
        }
        break;
      case Probe::kAbsent:
        break;
    }
  }
  return absl::UnavailableError(absl::StrCat(
      "Unix socket \"", path, "\" keeps being recreated by another process"));
}

}  // namespace

size_t MaxUnixSocketPath() { return sizeof(sockaddr_un::sun_path) - 1; }

std::string PrivateBindPath(const std::string& path) {
  static std::atomic<int> counter{0};
  std::string dir = DirOf(path);
  return absl::StrCat(dir == "/" ? "" : dir, "/.bm", getpid(), "-", counter++);
}

absl::StatusOr<std::unique_ptr<OwnedUnixSocket>> OwnedUnixSocket::Publish(
    const std::string& bound, const std::string& path) {
  struct Unlinker {
    const std::string& file;
    ~Unlinker() { unlink(file.c_str()); }
  } remove_bound{bound};
  if (path.empty() || path.size() > MaxUnixSocketPath()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Unix socket path \"", path, "\" is empty or longer than ",
                     MaxUnixSocketPath(), " bytes"));
  }
  struct stat st;
  if (lstat(bound.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) {
    return absl::InternalError(
        absl::StrCat("no bound socket at \"", bound, "\" to publish"));
  }
  absl::StatusOr<DirLock> lock = DirLock::Take(DirOf(path));
  if (!lock.ok()) return lock.status();
  if (absl::Status s = LinkNoReplace(bound, path); !s.ok()) return s;
  return std::unique_ptr<OwnedUnixSocket>(
      new OwnedUnixSocket(path, st.st_dev, st.st_ino));
}

OwnedUnixSocket::~OwnedUnixSocket() {
  absl::StatusOr<DirLock> lock = DirLock::Take(DirOf(path_));
  // Without the lock (the directory is gone or unreadable), still remove
  // only our own file.
  struct stat st;
  if (lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
      st.st_dev == dev_ && st.st_ino == ino_) {
    unlink(path_.c_str());
  }
}

}  // namespace blockmeta
