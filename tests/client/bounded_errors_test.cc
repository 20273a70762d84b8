// tests/client/bounded_errors_test.cc — caller-supplied strings in errors
// are bounded (issue 21 item 8): a real blockmetad, the real client
// library, and names, contexts, paths and URIs of 1 MiB. Every call gets
// its precise code (INVALID_ARGUMENT for an over-long export name, on the
// Admin API too) and a message of at most ~1 KiB, never gRPC's "received
// initial metadata size exceeds limit".
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/blockmeta_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::testing {
namespace {

using ::blockmeta::testing::StatusIs;

using ::blockmeta::client::BlockMetaClient;
using ::blockmeta::client::ClientOptions;
namespace v1 = ::blockmeta::v1;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr size_t kMessageBound = 1024;
const std::string kHuge(1 << 20, 'n');

class BoundedErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto k =
        NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "memory", "16M"});
    ASSERT_TRUE(k.ok()) << k.status();
    nbdkit_ = *std::move(k);
    auto s = Blockmetad::Start({{"mem", nbdkit_->uri()}});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    ClientOptions o;
    o.target = server_->target();  // the Unix socket: Admin calls allowed
    o.deadline = absl::Seconds(20);
    auto c = BlockMetaClient::Connect(o);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }

  // The status is `code`, bounded, and names the problem.
  static void ExpectBounded(const absl::Status& s, absl::StatusCode code,
                            const std::string& what) {
    EXPECT_THAT(s, StatusIs(code))
        << what << ": " << s.ToString().substr(0, 300);
    EXPECT_LE(s.message().size(), kMessageBound) << what;
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr("metadata size")))
        << what;
  }

  std::unique_ptr<NbdProcess> nbdkit_;
  std::unique_ptr<Blockmetad> server_;
  std::unique_ptr<BlockMetaClient> client_;
};

TEST_F(BoundedErrorsTest, HugeExportNamesOnTheAdminApi) {
  v1::AddExportRequest add;
  add.mutable_config()->set_name(kHuge);
  add.mutable_config()->set_nbd_uri(nbdkit_->uri());
  absl::Status s = client_->AddExport(add).status();
  ExpectBounded(s, absl::StatusCode::kInvalidArgument, "AddExport");
  EXPECT_THAT(std::string(s.message()), HasSubstr("(1048576 bytes)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("longer than 256 bytes"));

  s = client_->RemoveExport(kHuge).status();
  ExpectBounded(s, absl::StatusCode::kInvalidArgument, "RemoveExport");
  EXPECT_THAT(std::string(s.message()), HasSubstr("longer than 256 bytes"));

  // 257 bytes is one over the limit; 256 is allowed (and unknown).
  s = client_->RemoveExport(std::string(257, 'n')).status();
  ExpectBounded(s, absl::StatusCode::kInvalidArgument, "RemoveExport 257");
  s = client_->RemoveExport(std::string(256, 'n')).status();
  ExpectBounded(s, absl::StatusCode::kNotFound, "RemoveExport 256");
}

TEST_F(BoundedErrorsTest, HugeStringsOnTheAdminApi) {
  v1::AddExportRequest add;
  add.mutable_config()->set_name("img");
  add.mutable_config()->mutable_image()->set_path("/" + kHuge);
  ExpectBounded(client_->AddExport(add).status(),
                absl::StatusCode::kInvalidArgument, "image path");

  add.mutable_config()->mutable_image()->set_path("/dev/null");
  add.mutable_config()->mutable_image()->set_format(kHuge);
  ExpectBounded(client_->AddExport(add).status(),
                absl::StatusCode::kInvalidArgument, "image format");

  add.mutable_config()->set_nbd_uri("http://" + kHuge);
  ExpectBounded(client_->AddExport(add).status(),
                absl::StatusCode::kInvalidArgument, "URI scheme");
}

TEST_F(BoundedErrorsTest, HugeStringsOnTheBlockMetaApi) {
  ExpectBounded(client_->GetExportInfo(kHuge).status(),
                absl::StatusCode::kInvalidArgument, "GetExportInfo");
  v1::GetExtentsRequest get;
  get.set_export_name("mem");
  get.set_length(4096);
  get.set_context(kHuge);
  ExpectBounded(client_->GetExtents(get).status(),
                absl::StatusCode::kInvalidArgument, "GetExtents context");
  get.set_context("base:allocation");
  get.set_export_name(kHuge);
  ExpectBounded(client_->GetExtents(get).status(),
                absl::StatusCode::kInvalidArgument, "GetExtents name");
  v1::MapExtentsRequest map;
  map.set_export_name(kHuge);
  auto it = client_->MapExtents(map);
  v1::Extent e;
  ExpectBounded(it->Next(&e).status(), absl::StatusCode::kInvalidArgument,
                "MapExtents");
  ExpectBounded(client_->GetStats(kHuge).status(),
                absl::StatusCode::kInvalidArgument, "GetStats");
}

}  // namespace
}  // namespace blockmeta::testing
