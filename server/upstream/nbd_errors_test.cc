// server/upstream/nbd_errors_test.cc — both directions of the error map,
// including a real libnbd failure read on the calling thread.
#include "server/upstream/nbd_errors.h"

#include <errno.h>
#include <libnbd.h>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

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
  struct Case {
    absl::Status status;
    uint32_t nbd;
  };
  const Case cases[] = {
      {absl::OkStatus(), 0},
      {absl::InvalidArgumentError(""), kNbdEinval},
      {absl::OutOfRangeError(""), kNbdEinval},
      {absl::FailedPreconditionError(""), kNbdEinval},
      {absl::PermissionDeniedError(""), kNbdEperm},
      {absl::UnauthenticatedError(""), kNbdEperm},
      // Our own limits: only an upstream can say its disk is full.
      {absl::ResourceExhaustedError(""), kNbdEnomem},
      {absl::UnimplementedError(""), kNbdEnotsup},
      {absl::CancelledError(""), kNbdEshutdown},
      {absl::AbortedError(""), kNbdEshutdown},
      {absl::UnavailableError(""), kNbdEio},
      {absl::DeadlineExceededError(""), kNbdEio},
      {absl::DataLossError(""), kNbdEio},
      {absl::InternalError(""), kNbdEio},
      {absl::UnknownError(""), kNbdEio},
      {absl::NotFoundError(""), kNbdEio},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(NbdErrorFromStatus(c.status), c.nbd) << c.status;
  }
}

// doc/proto.md "Error values": the numbers are the protocol's, fixed.
TEST(NbdErrorsTest, ProtocolValues) {
  EXPECT_EQ(nbd::kNbdEperm, 1u);
  EXPECT_EQ(nbd::kNbdEio, 5u);
  EXPECT_EQ(nbd::kNbdEnomem, 12u);
  EXPECT_EQ(nbd::kNbdEinval, 22u);
  EXPECT_EQ(nbd::kNbdEnospc, 28u);
  EXPECT_EQ(nbd::kNbdEoverflow, 75u);
  EXPECT_EQ(nbd::kNbdEnotsup, 95u);
  EXPECT_EQ(nbd::kNbdEshutdown, 108u);
}

// Every errno an upstream's NBD error arrives as (libnbd turns the wire
// value into errno) goes back out of the shim as the same NBD error, even
// where several share one absl code (ENOMEM and ENOSPC; ESHUTDOWN is
// UNAVAILABLE like a lost connection, which is EIO).
TEST(NbdErrorsTest, EveryNbdErrorSurvivesTheRoundTrip) {
  struct Case {
    int err;
    uint32_t nbd;
    absl::StatusCode code;
  };
  const Case cases[] = {
      {EPERM, kNbdEperm, absl::StatusCode::kPermissionDenied},
      {EIO, kNbdEio, absl::StatusCode::kDataLoss},
      {ENOMEM, kNbdEnomem, absl::StatusCode::kResourceExhausted},
      {EINVAL, kNbdEinval, absl::StatusCode::kInvalidArgument},
      {ENOSPC, kNbdEnospc, absl::StatusCode::kResourceExhausted},
      {EOVERFLOW, kNbdEoverflow, absl::StatusCode::kOutOfRange},
      {ENOTSUP, kNbdEnotsup, absl::StatusCode::kUnimplemented},
      {ESHUTDOWN, kNbdEshutdown, absl::StatusCode::kUnavailable},
      // Host errnos outside the NBD list map to their nearest NBD error.
      {EACCES, kNbdEperm, absl::StatusCode::kPermissionDenied},
      {EROFS, kNbdEperm, absl::StatusCode::kPermissionDenied},
      {EDQUOT, kNbdEnospc, absl::StatusCode::kResourceExhausted},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(NbdErrorFromErrno(c.err), c.nbd) << c.err;
    absl::Status s = StatusFromErrno(c.err, "x", "");
    EXPECT_THAT(s, StatusIs(c.code)) << c.err;
    EXPECT_EQ(RecordedNbdError(s), c.nbd) << c.err;
    EXPECT_EQ(NbdErrorFromStatus(s), c.nbd) << c.err;
    // A copy keeps it (the cache and the shim pass statuses by value); the
    // copy is what is tested.
    // NOLINTNEXTLINE(performance-unnecessary-copy-initialization)
    absl::Status copy = s;
    EXPECT_EQ(NbdErrorFromStatus(copy), c.nbd) << c.err;
  }
  // No NBD meaning: no payload, the code decides.
  for (int err : {ENOTCONN, ECONNRESET, ETIMEDOUT, EPROTO, ERANGE, 0}) {
    EXPECT_EQ(NbdErrorFromErrno(err), 0u) << err;
    absl::Status s = StatusFromErrno(err, "x", "");
    EXPECT_EQ(RecordedNbdError(s), 0u) << err;
  }
  EXPECT_EQ(NbdErrorFromStatus(StatusFromErrno(ENOTCONN, "x", "")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(StatusFromErrno(ERANGE, "x", "")), kNbdEinval);
}

TEST(NbdErrorsTest, WithNbdErrorOverridesTheCode) {
  absl::Status s = WithNbdError(absl::UnavailableError("going"), kNbdEshutdown);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(s.message(), "going");
  EXPECT_EQ(NbdErrorFromStatus(s), kNbdEshutdown);
  // Not an NBD error value, or an OK status: nothing recorded.
  EXPECT_EQ(RecordedNbdError(WithNbdError(absl::InternalError(""), 7)), 0u);
  EXPECT_TRUE(WithNbdError(absl::OkStatus(), kNbdEio).ok());
  EXPECT_EQ(NbdErrorFromStatus(WithNbdError(absl::OkStatus(), kNbdEio)), 0u);
}

TEST(NbdErrorsTest, FromRealLibnbdFailure) {
  nbd_handle* h = nbd_create();
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(nbd_connect_unix(h, "/nonexistent/dir/sock"), -1);
  absl::Status s = StatusFromNbdError("connect");
  nbd_close(h);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable)) << s;
  EXPECT_TRUE(absl::StartsWith(s.message(), "connect: ")) << s;
}

}  // namespace
}  // namespace blockmeta
