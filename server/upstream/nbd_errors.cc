// server/upstream/nbd_errors.cc — see nbd_errors.h.
#include "server/upstream/nbd_errors.h"

#include <errno.h>
#include <libnbd.h>

#include "absl/strings/str_cat.h"
#include "server/common/errno_text.h"

namespace blockmeta {

absl::StatusCode StatusCodeFromErrno(int err) {
  switch (err) {
    case EINVAL:
      return absl::StatusCode::kInvalidArgument;
    case EPERM:
    case EACCES:
    case EROFS:
      return absl::StatusCode::kPermissionDenied;
    case ENOSPC:
    case EDQUOT:
    case ENOMEM:
      return absl::StatusCode::kResourceExhausted;
    case EOVERFLOW:
    case ERANGE:
      return absl::StatusCode::kOutOfRange;
    case ENOTCONN:
    case ECONNRESET:
    case ECONNREFUSED:
    case ECONNABORTED:
    case EPIPE:
    case ESHUTDOWN:
    case ENOENT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EAGAIN:
      return absl::StatusCode::kUnavailable;
    case ETIMEDOUT:
      return absl::StatusCode::kDeadlineExceeded;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return absl::StatusCode::kUnimplemented;
    case EIO:
      return absl::StatusCode::kDataLoss;
    default:
      return absl::StatusCode::kUnknown;
  }
}

absl::Status StatusFromErrno(int err, absl::string_view what,
                             absl::string_view detail) {
  std::string msg = absl::StrCat(what, ": ", detail);
  if (detail.empty()) msg = absl::StrCat(what, ": ", ErrnoText(err));
  return absl::Status(StatusCodeFromErrno(err), msg);
}

absl::Status StatusFromNbdError(absl::string_view what) {
  const int err = nbd_get_errno();
  const char* detail = nbd_get_error();
  return StatusFromErrno(err, what, detail != nullptr ? detail : "");
}

uint32_t NbdErrorFromStatus(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return kNbdEinval;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      return kNbdEperm;
    case absl::StatusCode::kResourceExhausted:
      return kNbdEnospc;
    case absl::StatusCode::kUnimplemented:
      return kNbdEnotsup;
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kAborted:
      return kNbdEshutdown;
    default:
      return kNbdEio;
  }
}

}  // namespace blockmeta
