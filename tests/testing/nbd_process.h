// tests/testing/nbd_process.h — test support: spawn NBD servers (nbdkit,
// qemu-nbd) on Unix sockets, run helper commands, make disk images.
//
// Every child process is put in its own process group and is killed and
// reaped by the owning object's destructor, also when a test fails early.
// All waits are bounded by a timeout, so a broken tool cannot hang a test.
//
// Thread-safety: an NbdProcess / TempDir is owned by one test thread; the
// free functions are thread-safe (fork/exec with argv prepared beforehand).
#ifndef BLOCKMETA_TESTS_TESTING_NBD_PROCESS_H_
#define BLOCKMETA_TESTS_TESTING_NBD_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace blockmeta::testing {

// A fresh directory under $TEST_TMPDIR (else $TMPDIR, else /tmp); it and
// everything in it are removed in the destructor. When the base path is too
// long for Unix socket paths (sun_path is 108 bytes), /tmp is used instead.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string File(const std::string& name) const;

 private:
  std::string path_;
};

// An NBD server process serving on a fresh Unix socket in its own TempDir.
// argv elements equal to or containing "{sock}" get the socket path
// substituted. Start() waits until the socket accepts connections (polling
// connect(2), bounded by `timeout`) and fails early, with the server's
// stderr, if the process exits first.
//
// Note: qemu-nbd exits when its first client disconnects unless given -t
// (--persistent), and serves one client at a time unless given --shared=N.
class NbdProcess {
 public:
  static absl::StatusOr<std::unique_ptr<NbdProcess>> Start(
      std::vector<std::string> argv,
      absl::Duration timeout = absl::Seconds(20));
  ~NbdProcess();  // Kill()
  NbdProcess(const NbdProcess&) = delete;
  NbdProcess& operator=(const NbdProcess&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  // "nbd+unix:///?socket=PATH" or "nbd+unix:///EXPORT?socket=PATH".
  std::string uri(const std::string& export_name = "") const;
  // -1 when not running.
  pid_t pid() const { return pid_; }
  // The server's stderr so far (for failure messages).
  std::string Log() const;

  // SIGKILL to the process group, then reap. Idempotent.
  void Kill();
  // Kill() then start again with the same argv on the same socket path.
  absl::Status Restart();

 private:
  NbdProcess() = default;
  absl::Status Spawn();

  std::unique_ptr<TempDir> dir_;
  std::vector<std::string> argv_;  // with {sock} substituted
  std::string socket_path_;
  std::string log_path_;
  absl::Duration timeout_;
  pid_t pid_ = -1;
};

// Runs argv to completion; returns its stdout. Error (with the exit status
// and stderr) on a nonzero exit, a signal, or a timeout (the process group
// is killed then). INTERNAL for failures to start.
absl::StatusOr<std::string> RunCommand(
    const std::vector<std::string>& argv,
    absl::Duration timeout = absl::Seconds(60));

// Creates an image with qemu-img ("raw" or "qcow2", `size` bytes), then runs
// each qemu-io command on it (e.g. "write -P 0xab 1M 64k",
// "write -z 2M 64k", "discard 0 64k").
absl::Status MakeImage(const std::string& path, const std::string& format,
                       uint64_t size,
                       const std::vector<std::string>& qemu_io_cmds = {});

// Runs qemu-io commands on an existing image (e.g. to dirty a bitmap).
absl::Status QemuIo(const std::string& path, const std::string& format,
                    const std::vector<std::string>& qemu_io_cmds);

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_NBD_PROCESS_H_
