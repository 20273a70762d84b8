// server/upstream/nbd_errors.h — the one mapping between libnbd / NBD
// errors and absl::Status, in both directions.
//
// errno → absl code (StatusFromErrno / StatusFromNbdError):
//   EINVAL                               INVALID_ARGUMENT
//   EPERM, EACCES, EROFS                 PERMISSION_DENIED
//   ENOSPC, EDQUOT, ENOMEM               RESOURCE_EXHAUSTED
//   EOVERFLOW, ERANGE                    OUT_OF_RANGE
//   ENOTCONN, ECONNRESET, ECONNREFUSED,
//   EPIPE, ESHUTDOWN, ENOENT (socket),
//   EHOSTUNREACH, ENETUNREACH            UNAVAILABLE
//   ETIMEDOUT                            DEADLINE_EXCEEDED
//   ENOTSUP / EOPNOTSUPP                 UNIMPLEMENTED
//   EIO, EPROTO, ... (everything else)   DATA_LOSS for EIO, UNKNOWN otherwise
// EIO is what an NBD server answers when the storage under it failed (a
// disk read error, nbdkit's error filter): the data could not be produced,
// which absl calls DATA_LOSS ("unrecoverable data loss or corruption") —
// distinct from UNAVAILABLE (the upstream is down; retry), so clients do not
// retry a bad sector forever. The Upstream overrides the code to UNAVAILABLE
// whenever the libnbd handle itself died, whatever errno said.
//
// absl code → NBD error (NbdErrorFromStatus), for the NBD shim's replies:
//   OK 0; INVALID_ARGUMENT, FAILED_PRECONDITION → NBD_EINVAL;
//   OUT_OF_RANGE → NBD_EINVAL (the NBD spec answers past-the-end with
//   EINVAL); PERMISSION_DENIED → NBD_EPERM; RESOURCE_EXHAUSTED → NBD_ENOSPC;
//   UNIMPLEMENTED → NBD_ENOTSUP; CANCELLED, ABORTED → NBD_ESHUTDOWN (the
//   server is going away); everything else (UNAVAILABLE, DEADLINE_EXCEEDED,
//   DATA_LOSS, INTERNAL, ...) → NBD_EIO.
//
// Thread-safety: all functions are thread-safe. StatusFromNbdError reads
// libnbd's per-thread error, so call it right after the failing libnbd call
// on the same thread.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace blockmeta {

// NBD protocol error values (doc/proto.md "Error values").
inline constexpr uint32_t kNbdEperm = 1;
inline constexpr uint32_t kNbdEio = 5;
inline constexpr uint32_t kNbdEnomem = 12;
inline constexpr uint32_t kNbdEinval = 22;
inline constexpr uint32_t kNbdEnospc = 28;
inline constexpr uint32_t kNbdEoverflow = 75;
inline constexpr uint32_t kNbdEnotsup = 95;
inline constexpr uint32_t kNbdEshutdown = 108;

// The absl code for an errno value (table above).
absl::StatusCode StatusCodeFromErrno(int err);

// A status for errno `err` with message "WHAT: DETAIL". OK when err == 0 is
// not meaningful: err 0 gives UNKNOWN.
absl::Status StatusFromErrno(int err, absl::string_view what,
                             absl::string_view detail);

// The status for the libnbd call that just failed on this thread:
// nbd_get_errno() mapped as above, message "WHAT: nbd_get_error()".
absl::Status StatusFromNbdError(absl::string_view what);

// The NBD error to send for a failed status (0 for OK).
uint32_t NbdErrorFromStatus(const absl::Status& status);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_
