// server/common/unix_socket.h — one listener per Unix socket path: a live
// server's socket file is never replaced, a stale one (left by a process
// that died) is reused, and a server removes at exit only a socket file
// that is still its own.
//
// The listener binds its socket under a private name beside the path
// (PrivateBindPath), then Publish() links that file to the path with
// link(2), which never replaces an existing file. If the path exists,
// Publish probes it with connect(2): a server accepting there (or with a
// full backlog) means refusal (ALREADY_EXISTS); ECONNREFUSED means a stale
// socket, which is removed and the link retried; anything that is not a
// socket is left alone (FAILED_PRECONDITION). Probing, removing and linking
// run under an exclusive flock(2) on the directory, so two blockmetads
// starting at once cannot both judge the same file stale. The private name
// is removed once published.
//
// Binding under a private name also keeps gRPC from deleting the path: gRPC
// (1.51, tcp_server_posix.cc) unlinks a Unix socket's path before it binds
// and again when the server shuts down, whoever owns the file by then. It
// only ever sees the private name.
//
// At destruction an OwnedUnixSocket removes the path only if it still names
// the file it published (same st_dev and st_ino recorded at publish time):
// a socket file another server put there since is kept.
//
// Thread-compatible; every call does a few syscalls.
#ifndef BLOCKMETA_SERVER_COMMON_UNIX_SOCKET_H_
#define BLOCKMETA_SERVER_COMMON_UNIX_SOCKET_H_

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace blockmeta {

// A name in `path`'s directory, unique to this process and call, short
// enough for sockaddr_un when `path` is (it is at most a dozen bytes longer
// than the directory plus one): ".bm<pid>-<n>".
std::string PrivateBindPath(const std::string& path);

// The longest path a Unix socket can be bound or connected at (sun_path
// less its terminating NUL).
size_t MaxUnixSocketPath();

class OwnedUnixSocket {
 public:
  // Makes the socket file bound (and listening) at `bound` reachable at
  // `path`, as described above, then removes `bound`. On failure `bound`
  // is removed too and the status says why, naming `path`.
  static absl::StatusOr<std::unique_ptr<OwnedUnixSocket>> Publish(
      const std::string& bound, const std::string& path);

  // Removes the path if it still names the published file.
  ~OwnedUnixSocket();

  OwnedUnixSocket(const OwnedUnixSocket&) = delete;
  OwnedUnixSocket& operator=(const OwnedUnixSocket&) = delete;

  const std::string& path() const { return path_; }

 private:
  OwnedUnixSocket(std::string path, dev_t dev, ino_t ino)
      : path_(std::move(path)), dev_(dev), ino_(ino) {}

  const std::string path_;
  const dev_t dev_;
  const ino_t ino_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_UNIX_SOCKET_H_
