// tests/testing/nbd_upstream_test_util.cc — see nbd_upstream_test_util.h.
#include "tests/testing/nbd_upstream_test_util.h"

#include <utility>

#include "gtest/gtest.h"
#include "server/upstream/nbd_upstream.h"

namespace blockmeta {

std::unique_ptr<Upstream> Connect(const blockmeta::v1::ExportConfig& config) {
  absl::StatusOr<std::unique_ptr<Upstream>> up = CreateUpstream(config);
  EXPECT_TRUE(up.ok()) << up.status();
  if (!up.ok()) return nullptr;
  EXPECT_TRUE((*up)->WaitReady(absl::Now() + absl::Seconds(20)))
      << (*up)->LastError();
  return std::move(*up);
}

blockmeta::v1::ExportConfig UriExport(const std::string& uri) {
  blockmeta::v1::ExportConfig c;
  c.set_name("e");
  c.set_nbd_uri(uri);
  return c;
}

blockmeta::v1::ExportConfig CommandExport(
    const std::vector<std::string>& argv) {
  blockmeta::v1::ExportConfig c;
  c.set_name("cmd");
  for (const auto& a : argv) c.mutable_command()->add_argv(a);
  return c;
}

blockmeta::v1::ExportConfig ImageExport(
    const std::string& path, bool read_only,
    const std::vector<std::string>& bitmaps) {
  blockmeta::v1::ExportConfig c;
  c.set_name("img");
  c.mutable_image()->set_path(path);
  c.mutable_image()->set_read_only(read_only);
  for (const auto& b : bitmaps) c.mutable_image()->add_bitmaps(b);
  return c;
}

}  // namespace blockmeta
