// server/upstream/nbd_errors.cc — see nbd_errors.h.
#include "server/upstream/nbd_errors.h"

#include <errno.h>
#include <libnbd.h>

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace {

// The payload that records the NBD error: its decimal value.
constexpr char kNbdErrorPayload[] = "type.blockmeta.dev/blockmeta.NbdError";

bool IsNbdError(uint32_t v) {
  switch (v) {
    case nbd::kNbdEperm:
    case nbd::kNbdEio:
    case nbd::kNbdEnomem:
    case nbd::kNbdEinval:
    case nbd::kNbdEnospc:
    case nbd::kNbdEoverflow:
    case nbd::kNbdEnotsup:
    case nbd::kNbdEshutdown:
      return true;
    default:
      return false;
  }
}

}  // namespace

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

uint32_t NbdErrorFromErrno(int err) {
  switch (err) {
    case EPERM:
    case EACCES:
    case EROFS:
      return nbd::kNbdEperm;
    case EIO:
      return nbd::kNbdEio;
    case ENOMEM:
      return nbd::kNbdEnomem;
    case EINVAL:
      return nbd::kNbdEinval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return nbd::kNbdEnospc;
    case EOVERFLOW:
      return nbd::kNbdEoverflow;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return nbd::kNbdEnotsup;
    case ESHUTDOWN:
      return nbd::kNbdEshutdown;
    default:
      return 0;
  }
}

absl::Status StatusFromErrno(int err, absl::string_view what,
                             absl::string_view detail) {
  std::string msg = absl::StrCat(what, ": ", detail);
  if (detail.empty()) msg = absl::StrCat(what, ": ", ErrnoText(err));
  absl::Status s(StatusCodeFromErrno(err), msg);
  const uint32_t nbd_error = NbdErrorFromErrno(err);
  return nbd_error != 0 ? WithNbdError(std::move(s), nbd_error) : s;
}

absl::Status StatusFromNbdError(absl::string_view what) {
  const int err = nbd_get_errno();
  const char* detail = nbd_get_error();
  return StatusFromErrno(err, what, detail != nullptr ? detail : "");
}

absl::Status WithNbdError(absl::Status status, uint32_t nbd_error) {
  if (!status.ok() && IsNbdError(nbd_error)) {
    status.SetPayload(kNbdErrorPayload, absl::Cord(absl::StrCat(nbd_error)));
  }
  return status;
}

uint32_t RecordedNbdError(const absl::Status& status) {
  const auto p = status.GetPayload(kNbdErrorPayload);
  uint32_t v = 0;
  if (!p.has_value() || !absl::SimpleAtoi(std::string(*p), &v)) return 0;
  return IsNbdError(v) ? v : 0;
}

uint32_t NbdErrorFromStatus(const absl::Status& status) {
  if (status.ok()) return 0;
  if (const uint32_t recorded = RecordedNbdError(status); recorded != 0) {
    return recorded;
  }
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return nbd::kNbdEinval;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      return nbd::kNbdEperm;
    case absl::StatusCode::kResourceExhausted:
      return nbd::kNbdEnomem;
    case absl::StatusCode::kUnimplemented:
      return nbd::kNbdEnotsup;
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kAborted:
      return nbd::kNbdEshutdown;
    default:
      return nbd::kNbdEio;
  }
}

}  // namespace blockmeta
