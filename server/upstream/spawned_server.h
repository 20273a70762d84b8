// server/upstream/spawned_server.h — an NBD server process (qemu-nbd,
// nbdkit) that blockmeta starts itself, by systemd socket activation.
//
// Start() creates a listening Unix socket in a private directory, then
// forks the server with that socket as fd 3 and LISTEN_PID / LISTEN_FDS set
// (what libnbd's nbd_connect_systemd_socket_activation does, but done here
// so that ONE process serves every connection of the pool: each handle then
// simply connects to socket_path()). The socket listens before the server
// runs, so connecting never races the server's start-up. The parent keeps no
// copy of the listening socket, so once the server dies connects fail at
// once (ECONNREFUSED) instead of queueing.
//
// The server runs in its own process group; Stop() sends SIGTERM to the
// group, waits up to the grace period, then SIGKILLs it, and always reaps
// it. Only this pid is ever waited for (never waitpid(-1)). The server's
// stderr goes to a file in the private directory (LogTail() for errors).
//
// Never outliving blockmetad: the child sets PR_SET_PDEATHSIG(SIGKILL)
// before exec (prctl(2)), so the kernel kills it when we die by any
// signal, SIGKILL included, and the image lock it held (qemu-nbd's qcow2
// write lock) is released. The parent-death signal fires when the THREAD
// that forked exits, not the process, so every fork happens on one
// dedicated spawner thread that lives as long as the process. The private
// directory holds an "owner" file (our pid and start time):
// CleanStaleSpawnDirs() at the next start removes directories whose owner
// is gone.
//
// Thread-safety: all methods are thread-safe (one internal mutex; Stop()
// may sleep while holding it for up to the grace period).
#ifndef BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_
#define BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"

namespace blockmeta {

// Removes the private directories (under $TMPDIR or /tmp) whose owning
// blockmetad no longer runs. Returns how many were removed.
int CleanStaleSpawnDirs();

class SpawnedServer {
 public:
  // Makes the private directory (under $TMPDIR or /tmp); does not start.
  static absl::StatusOr<std::unique_ptr<SpawnedServer>> Create(
      std::vector<std::string> argv);
  ~SpawnedServer();  // Stop(), then removes the directory
  SpawnedServer(const SpawnedServer&) = delete;
  SpawnedServer& operator=(const SpawnedServer&) = delete;

  // Starts the server (stopping a previous instance first).
  absl::Status Start();
  // True while the process runs; reaps it (and records how it ended) once
  // it has exited.
  bool Running();
  // SIGTERM, up to `grace`, then SIGKILL; reaps. Idempotent.
  void Stop(absl::Duration grace = absl::Seconds(2));

  const std::string& socket_path() const { return socket_path_; }
  // -1 when not running.
  pid_t pid() const;
  // "exited with status 1: <last lines of stderr>" after an exit, else "".
  std::string ExitDescription() const;
  const std::vector<std::string>& argv() const { return argv_; }

 private:
  SpawnedServer() = default;
  std::string LogTail() const;
  void ReapLocked(int wstatus) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after Create().
  std::vector<std::string> argv_;
  std::string dir_;
  std::string socket_path_;
  std::string log_path_;

  mutable sync::Mutex mu_;
  pid_t pid_ ABSL_GUARDED_BY(mu_) = -1;
  std::string exit_description_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_
