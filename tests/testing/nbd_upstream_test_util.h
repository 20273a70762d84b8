// tests/testing/nbd_upstream_test_util.h — helpers shared by the
// upstream's tests (testonly): export configs for each upstream kind, a
// connect-and-wait, a deadline and a bounded poll.
#ifndef BLOCKMETA_TESTS_TESTING_NBD_UPSTREAM_TEST_UTIL_H_
#define BLOCKMETA_TESTS_TESTING_NBD_UPSTREAM_TEST_UTIL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/upstream/upstream.h"
#include "tests/testing/eventually.h"

namespace blockmeta {

// A deadline 10 s from now.
inline absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

// CreateUpstream + WaitReady (20 s); a test failure and nullptr otherwise.
std::unique_ptr<Upstream> Connect(const blockmeta::v1::ExportConfig& config);

blockmeta::v1::ExportConfig UriExport(const std::string& uri);
blockmeta::v1::ExportConfig CommandExport(const std::vector<std::string>& argv);
blockmeta::v1::ExportConfig ImageExport(
    const std::string& path, bool read_only,
    const std::vector<std::string>& bitmaps = {});

// testing::Eventually (eventually.h) with these tests' 15 s default.
inline bool Eventually(absl::FunctionRef<bool()> pred,
                       absl::Duration limit = absl::Seconds(15)) {
  return testing::Eventually(pred, limit);
}

}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_NBD_UPSTREAM_TEST_UTIL_H_
