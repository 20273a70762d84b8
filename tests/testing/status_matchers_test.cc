// tests/testing/status_matchers_test.cc — StatusIs / IsOk on each status
// type, and what a failure says.
#include "tests/testing/status_matchers.h"

#include <string>

#include "gmock/gmock.h"
#include "grpcpp/support/status.h"
#include "gtest/gtest.h"

namespace blockmeta {
namespace testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

template <typename M, typename T>
std::string Explain(const M& matcher, const T& value) {
  ::testing::StringMatchResultListener l;
  ::testing::Matcher<const T&> m = matcher;
  EXPECT_FALSE(m.MatchAndExplain(value, &l));
  return l.str();
}

TEST(StatusMatchersTest, AbslStatus) {
  absl::Status s = absl::NotFoundError("export \"x\" not found");
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound, HasSubstr("\"x\"")));
  EXPECT_THAT(s, Not(StatusIs(absl::StatusCode::kNotFound, "other")));
  EXPECT_THAT(s, Not(StatusIs(absl::StatusCode::kInternal)));
  EXPECT_THAT(s, Not(IsOk()));
  EXPECT_THAT(absl::OkStatus(), IsOk());
}

TEST(StatusMatchersTest, StatusOr) {
  absl::StatusOr<int> ok = 3;
  absl::StatusOr<int> bad = absl::OutOfRangeError("past the end");
  EXPECT_THAT(ok, IsOk());
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kOutOfRange, "past the end"));
  EXPECT_THAT(bad, Not(IsOk()));
}

TEST(StatusMatchersTest, GrpcStatusWithEitherCodeEnum) {
  grpc::Status s(grpc::StatusCode::UNAVAILABLE, "upstream down");
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::UNAVAILABLE));
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("down")));
  EXPECT_THAT(s, Not(StatusIs(grpc::StatusCode::NOT_FOUND)));
  EXPECT_THAT(grpc::Status::OK, IsOk());
}

TEST(StatusMatchersTest, FailureNamesCodeAndMessage) {
  std::string why = Explain(StatusIs(absl::StatusCode::kNotFound),
                            absl::InternalError("boom"));
  EXPECT_THAT(why, HasSubstr("INTERNAL"));
  EXPECT_THAT(why, HasSubstr("boom"));
  ::testing::Matcher<const absl::Status&> m =
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("x"));
  EXPECT_THAT(::testing::DescribeMatcher<const absl::Status&>(m),
              HasSubstr("NOT_FOUND"));
}

}  // namespace
}  // namespace testing
}  // namespace blockmeta
