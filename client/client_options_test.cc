// client/client_options_test.cc — ValidateOptions.
#include "client/client_options.h"

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::StatusIs;

absl::StatusCode Check(const std::string& target) {
  ClientOptions o;
  o.target = target;
  return ValidateOptions(o).code();
}

TEST(ValidateOptions, Targets) {
  EXPECT_EQ(Check("localhost:50051"), absl::StatusCode::kOk);
  EXPECT_EQ(Check("127.0.0.1:1"), absl::StatusCode::kOk);
  EXPECT_EQ(Check("[::1]:50051"), absl::StatusCode::kOk);
  EXPECT_EQ(Check("unix:/run/x.sock"), absl::StatusCode::kOk);
  EXPECT_EQ(Check("unix:rel.sock"), absl::StatusCode::kOk);
  EXPECT_EQ(Check("dns:///example.com:443"), absl::StatusCode::kOk);
  EXPECT_EQ(Check(""), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("localhost"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("localhost:"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("localhost:http"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check(":50051"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("[::1]"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("unix:"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check("unix:/" + std::string(106, 'a')), absl::StatusCode::kOk);
  EXPECT_EQ(Check("unix:/" + std::string(107, 'a')),
            absl::StatusCode::kInvalidArgument);
}

TEST(ValidateOptions, TlsAndPolicy) {
  ClientOptions o;
  o.tls.cert_file = "c.pem";
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.tls.enabled = true;
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.tls.key_file = "k.pem";
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kOk));
  o.deadline = absl::ZeroDuration();
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.deadline = absl::Seconds(1);
  o.retry.max_attempts = 0;
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.retry.max_attempts = 1;
  o.retry.max_backoff = absl::Milliseconds(1);
  EXPECT_THAT(ValidateOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace blockmeta::client
