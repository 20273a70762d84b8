// server/upstream/nbd_errors_test.cc — both directions of the error map,
// including a real libnbd failure read on the calling thread.
#include "server/upstream/nbd_errors.h"

#include <errno.h>
#include <libnbd.h>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace blockmeta {
namespace {

TEST(NbdErrorsTest, ErrnoToStatus) {
  EXPECT_EQ(StatusCodeFromErrno(EINVAL), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StatusCodeFromErrno(EPERM), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(StatusCodeFromErrno(EROFS), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(StatusCodeFromErrno(ENOSPC), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(StatusCodeFromErrno(EOVERFLOW), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(StatusCodeFromErrno(ERANGE), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(StatusCodeFromErrno(ENOTCONN), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromErrno(ECONNRESET), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromErrno(EPIPE), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromErrno(ESHUTDOWN), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromErrno(ETIMEDOUT),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(StatusCodeFromErrno(ENOTSUP), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(StatusCodeFromErrno(EIO), absl::StatusCode::kDataLoss);
  EXPECT_EQ(StatusCodeFromErrno(EPROTO), absl::StatusCode::kUnknown);
  EXPECT_EQ(StatusCodeFromErrno(0), absl::StatusCode::kUnknown);
}

TEST(NbdErrorsTest, StatusToNbd) {
  EXPECT_EQ(NbdErrorFromStatus(absl::OkStatus()), 0u);
  EXPECT_EQ(NbdErrorFromStatus(absl::InvalidArgumentError("")), kNbdEinval);
  EXPECT_EQ(NbdErrorFromStatus(absl::OutOfRangeError("")), kNbdEinval);
  EXPECT_EQ(NbdErrorFromStatus(absl::FailedPreconditionError("")), kNbdEinval);
  EXPECT_EQ(NbdErrorFromStatus(absl::PermissionDeniedError("")), kNbdEperm);
  EXPECT_EQ(NbdErrorFromStatus(absl::ResourceExhaustedError("")), kNbdEnospc);
  EXPECT_EQ(NbdErrorFromStatus(absl::UnimplementedError("")), kNbdEnotsup);
  EXPECT_EQ(NbdErrorFromStatus(absl::CancelledError("")), kNbdEshutdown);
  EXPECT_EQ(NbdErrorFromStatus(absl::UnavailableError("")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(absl::DeadlineExceededError("")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(absl::DataLossError("")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(absl::InternalError("")), kNbdEio);
}

TEST(NbdErrorsTest, RoundTripKeepsTheNbdErrorClass) {
  for (int err : {EPERM, EINVAL, ENOSPC, ENOTSUP, EIO}) {
    uint32_t nbd = NbdErrorFromStatus(StatusFromErrno(err, "x", ""));
    EXPECT_EQ(nbd, static_cast<uint32_t>(err)) << err;
  }
}

TEST(NbdErrorsTest, FromRealLibnbdFailure) {
  nbd_handle* h = nbd_create();
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(nbd_connect_unix(h, "/nonexistent/dir/sock"), -1);
  absl::Status s = StatusFromNbdError("connect");
  nbd_close(h);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_TRUE(absl::StartsWith(s.message(), "connect: ")) << s;
}

}  // namespace
}  // namespace blockmeta
