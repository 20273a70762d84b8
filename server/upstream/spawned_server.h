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
// Not outliving blockmetad, cleanly: the child sets
// PR_SET_PDEATHSIG(SIGTERM) before exec (prctl(2)), so the kernel asks it to
// stop when we die by any signal, SIGKILL included. SIGTERM, not SIGKILL:
// qemu-nbd then closes its qcow2 dirty bitmaps (clearing their in-use flag)
// and releases the image lock; killed, it left every bitmap "inconsistent"
// and unusable at the next start. The parent-death signal fires when the
// THREAD that forked exits, not the process, so every fork happens on one
// dedicated spawner thread that lives as long as the process. The private
// directory holds an "owner" file (our pid and start time) and a "server"
// file (the child's): CleanStaleSpawnDirs() at the next start waits for a
// dead owner's server to finish exiting (10 s, then SIGTERM again; 30 s,
// then SIGKILL, logged) before removing the directory, so a restart does
// not race the old server for the image lock.
//
// Start-up failures are prompt: Start() returns FAILED_PRECONDITION when
// exec fails (a CLOEXEC pipe reports the child's errno), and an exit is
// described with its status, how long after start, and the last lines of
// stderr. An exit whose stderr says a qcow2 bitmap "is inconsistent" is
// described as such, counted (InconsistentBitmapExits) and logged at error
// level (upstream_bitmap_inconsistent).
//
// Thread-safety: all methods are thread-safe (one internal mutex; Stop()
// may sleep while holding it for up to the grace period).
#ifndef BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_
#define BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
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
  // `name` (the export) labels log lines.
  static absl::StatusOr<std::unique_ptr<SpawnedServer>> Create(
      std::vector<std::string> argv, std::string name = "");
  ~SpawnedServer();  // Stop(), then removes the directory
  SpawnedServer(const SpawnedServer&) = delete;
  SpawnedServer& operator=(const SpawnedServer&) = delete;

  // Starts the server (stopping a previous instance first); returns once it
  // has exec'd. FAILED_PRECONDITION "cannot run ..." when exec failed.
  absl::Status Start();
  // True while the process runs; reaps it (and records how it ended) once
  // it has exited.
  bool Running();
  // SIGTERM, up to `grace`, then SIGKILL; reaps. Idempotent.
  void Stop(absl::Duration grace = absl::Seconds(2));

  const std::string& socket_path() const { return socket_path_; }
  // -1 when not running.
  pid_t pid() const;
  // "exited with status 1 12 ms after start: <last lines of stderr>" after
  // an exit (prefixed with what to do when a bitmap was inconsistent), else
  // "".
  std::string ExitDescription() const;
  // Exits so far whose stderr said a qcow2 bitmap is inconsistent.
  uint64_t InconsistentBitmapExits() const {
    return inconsistent_bitmap_exits_.load(std::memory_order_relaxed);
  }
  const std::vector<std::string>& argv() const { return argv_; }

 private:
  SpawnedServer() = default;
  std::string LogTail() const;
  void ReapLocked(int wstatus) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after Create().
  std::vector<std::string> argv_;
  std::string name_;
  std::string dir_;
  std::string socket_path_;
  std::string log_path_;

  mutable sync::Mutex mu_;
  pid_t pid_ ABSL_GUARDED_BY(mu_) = -1;
  std::string exit_description_ ABSL_GUARDED_BY(mu_);
  absl::Time started_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> inconsistent_bitmap_exits_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_SPAWNED_SERVER_H_
