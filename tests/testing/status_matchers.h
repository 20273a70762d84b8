// tests/testing/status_matchers.h — gMock matchers for statuses (test
// only):
//
//   EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument,
//                           HasSubstr("offset")));
//   EXPECT_THAT(grpc_status, StatusIs(grpc::StatusCode::UNAVAILABLE));
//   ASSERT_THAT(r, IsOk());
//
// StatusIs(code[, message matcher]) matches an absl::Status, an
// absl::StatusOr<T> (its status()), or a grpc::Status (anything with
// error_code() and error_message()); `code` may be an absl::StatusCode or
// a grpc::StatusCode (the two enums share their numbers). The message
// matcher defaults to anything. A failure prints the code by name and the
// message. IsOk() is StatusIs(kOk).
//
// A test that expects a particular failure says which: StatusIs(code), not
// EXPECT_FALSE(s.ok()). Thread-safety: matchers are immutable.
#ifndef BLOCKMETA_TESTS_TESTING_STATUS_MATCHERS_H_
#define BLOCKMETA_TESTS_TESTING_STATUS_MATCHERS_H_

#include <ostream>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace blockmeta {
namespace testing {
namespace status_internal {

// The code and message of whatever status type a test holds.
struct View {
  int code;
  std::string message;
};

inline View ViewOf(const absl::Status& s) {
  return {static_cast<int>(s.code()), std::string(s.message())};
}
template <typename T>
View ViewOf(const absl::StatusOr<T>& s) {
  return ViewOf(s.status());
}
// grpc::Status without depending on gRPC here.
template <typename G,
          typename = decltype(std::declval<const G&>().error_code()),
          typename = decltype(std::declval<const G&>().error_message())>
View ViewOf(const G& s) {
  return {static_cast<int>(s.error_code()), std::string(s.error_message())};
}

inline std::string CodeName(int code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

class StatusIsImpl {
 public:
  StatusIsImpl(int code, ::testing::Matcher<const std::string&> message)
      : code_(code), message_(std::move(message)) {}

  template <typename S>
  bool MatchAndExplain(const S& status,
                       ::testing::MatchResultListener* listener) const {
    const View v = ViewOf(status);
    *listener << "whose code is " << CodeName(v.code) << " and message is \""
              << v.message << "\"";
    if (v.code != code_) return false;
    ::testing::StringMatchResultListener inner;
    if (!message_.MatchAndExplain(v.message, &inner)) {
      if (!inner.str().empty()) *listener << ", " << inner.str();
      return false;
    }
    return true;
  }

  void DescribeTo(std::ostream* os) const {
    *os << "has code " << CodeName(code_) << " and a message that ";
    message_.DescribeTo(os);
  }
  void DescribeNegationTo(std::ostream* os) const {
    *os << "does not have code " << CodeName(code_)
        << " or has a message that ";
    message_.DescribeNegationTo(os);
  }

 private:
  const int code_;
  const ::testing::Matcher<const std::string&> message_;
};

}  // namespace status_internal

// `Code`: absl::StatusCode or grpc::StatusCode.
template <typename Code, typename MessageMatcher>
::testing::PolymorphicMatcher<status_internal::StatusIsImpl> StatusIs(
    Code code, MessageMatcher message) {
  static_assert(std::is_enum<Code>::value, "StatusIs wants a status code");
  return ::testing::MakePolymorphicMatcher(status_internal::StatusIsImpl(
      static_cast<int>(code),
      ::testing::SafeMatcherCast<const std::string&>(std::move(message))));
}

template <typename Code>
::testing::PolymorphicMatcher<status_internal::StatusIsImpl> StatusIs(
    Code code) {
  return StatusIs(code, ::testing::_);
}

inline ::testing::PolymorphicMatcher<status_internal::StatusIsImpl> IsOk() {
  return StatusIs(absl::StatusCode::kOk);
}

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_STATUS_MATCHERS_H_
