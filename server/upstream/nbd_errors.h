// server/upstream/nbd_errors.h — the one mapping between errno (libnbd's
// and the system's), absl::Status and NBD error values, in every
// direction. The NBD error values themselves live in server/nbd/protocol.h
// (nbd::kNbdEperm, ...); this header maps to and from them.
//
// errno → absl code (StatusCodeFromErrno, StatusFromErrno,
// StatusFromNbdError):
//   EINVAL                               INVALID_ARGUMENT
//   EPERM, EACCES, EROFS                 PERMISSION_DENIED
//   ENOSPC, EDQUOT, ENOMEM               RESOURCE_EXHAUSTED
//   EOVERFLOW, ERANGE                    OUT_OF_RANGE
//   ENOTCONN, ECONNRESET, ECONNREFUSED,
//   ECONNABORTED, EPIPE, ESHUTDOWN,
//   ENOENT (socket), EHOSTUNREACH,
//   ENETUNREACH, EAGAIN                  UNAVAILABLE
//   ETIMEDOUT                            DEADLINE_EXCEEDED
//   ENOTSUP / EOPNOTSUPP                 UNIMPLEMENTED
//   EIO                                  DATA_LOSS
//   anything else (EPROTO, 0, ...)       UNKNOWN
// EIO is what an NBD server answers when the storage under it failed (a
// disk read error, nbdkit's error filter): the data could not be produced,
// which absl calls DATA_LOSS ("unrecoverable data loss or corruption") —
// distinct from UNAVAILABLE (the upstream is down; retry), so clients do not
// retry a bad sector forever. The Upstream overrides the code to UNAVAILABLE
// whenever the libnbd handle itself died, whatever errno said.
//
// errno → NBD error (NbdErrorFromErrno), doc/proto.md "Error values":
//   EPERM, EACCES, EROFS → NBD_EPERM;  EIO → NBD_EIO;
//   ENOMEM → NBD_ENOMEM;  EINVAL → NBD_EINVAL;
//   ENOSPC, EDQUOT, EFBIG → NBD_ENOSPC;  EOVERFLOW → NBD_EOVERFLOW;
//   ENOTSUP / EOPNOTSUPP → NBD_ENOTSUP;  ESHUTDOWN → NBD_ESHUTDOWN;
//   anything else → 0 (no NBD meaning).
//
// Several errno values share one absl code (ENOMEM and ENOSPC are both
// RESOURCE_EXHAUSTED), so the code alone cannot say which NBD error the
// upstream sent. StatusFromErrno therefore records the NBD error on the
// status as a payload (WithNbdError), and NbdErrorFromStatus prefers it:
// an upstream's NBD_ENOMEM reaches the shim's client as NBD_ENOMEM, its
// NBD_ESHUTDOWN as NBD_ESHUTDOWN. Payloads survive copies of the status
// (not a new status built from its message).
//
// absl status → NBD error (NbdErrorFromStatus), for the NBD shim's replies:
//   OK → 0; a recorded NBD error → that error; otherwise by code:
//   INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE → NBD_EINVAL (the
//   NBD spec answers past-the-end with EINVAL); PERMISSION_DENIED,
//   UNAUTHENTICATED → NBD_EPERM; RESOURCE_EXHAUSTED → NBD_ENOMEM (our own
//   limits: only an upstream can say its disk is full, NBD_ENOSPC, which
//   qemu treats as "pause the guest" under werror=enospc); UNIMPLEMENTED →
//   NBD_ENOTSUP; CANCELLED, ABORTED → NBD_ESHUTDOWN (the server is going
//   away); everything else (UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS,
//   INTERNAL, UNKNOWN, ...) → NBD_EIO.
//
// Thread-safety: all functions are thread-safe. StatusFromNbdError reads
// libnbd's per-thread error, so call it right after the failing libnbd call
// on the same thread.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/nbd/protocol.h"

namespace blockmeta {

// The NBD error values, defined in server/nbd/protocol.h, named here for
// code in namespace blockmeta that maps statuses (no second definition).
using nbd::kNbdEinval;
using nbd::kNbdEio;
using nbd::kNbdEnomem;
using nbd::kNbdEnospc;
using nbd::kNbdEnotsup;
using nbd::kNbdEoverflow;
using nbd::kNbdEperm;
using nbd::kNbdEshutdown;

// The absl code for an errno value (table above).
absl::StatusCode StatusCodeFromErrno(int err);

// The NBD error value for an errno (table above); 0 when it has none.
uint32_t NbdErrorFromErrno(int err);

// A status for errno `err` with message "WHAT: DETAIL" (DETAIL empty: the
// errno's text), carrying NbdErrorFromErrno(err) when there is one. err 0
// gives UNKNOWN.
absl::Status StatusFromErrno(int err, absl::string_view what,
                             absl::string_view detail);

// The status for the libnbd call that just failed on this thread:
// nbd_get_errno() mapped as above, message "WHAT: nbd_get_error()".
absl::Status StatusFromNbdError(absl::string_view what);

// `status` (not OK) carrying `nbd_error` (one of nbd::kNbdE*) as the NBD
// error to answer for it, whatever its code.
absl::Status WithNbdError(absl::Status status, uint32_t nbd_error);

// The NBD error recorded on `status` by WithNbdError / StatusFromErrno, or
// 0 when none is.
uint32_t RecordedNbdError(const absl::Status& status);

// The NBD error to send for a failed status (0 for OK; table above).
uint32_t NbdErrorFromStatus(const absl::Status& status);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_ERRORS_H_
