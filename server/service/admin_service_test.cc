// server/service/admin_service_test.cc — the Admin logic over a registry of
// fake upstreams (idempotent adds, conflicts, readiness, removal and
// generations, origins) and the access rule.
#include "server/service/admin_service.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/service/admin_grpc.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;

v1::AddExportRequest AddUri(const std::string& name, const std::string& uri) {
  v1::AddExportRequest r;
  r.mutable_config()->set_name(name);
  r.mutable_config()->set_nbd_uri(uri);
  return r;
}

class AdminServiceTest : public ::testing::Test {
 protected:
  AdminServiceTest()
      : registry_([this](const v1::ExportConfig& c)
                      -> absl::StatusOr<std::unique_ptr<Upstream>> {
          auto up = std::make_unique<FakeUpstream>(1 << 20, 512, false);
          // URIs containing "down" never become ready.
          up->set_ready(c.nbd_uri().find("down") == std::string::npos);
          return up;
        }),
        admin_(&registry_) {}
  absl::Time Soon() { return absl::Now() + absl::Milliseconds(300); }

  ExportRegistry registry_;
  AdminService admin_;
};

TEST_F(AdminServiceTest, AddIsIdempotentAndConflictIsAlreadyExists) {
  auto a = admin_.AddExport(AddUri("job1", "nbd://h/a"), Soon());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->created());
  EXPECT_EQ(a->export_info().origin(), v1::EXPORT_ORIGIN_API);
  EXPECT_EQ(a->export_info().state(), v1::EXPORT_STATE_READY);
  auto same = admin_.AddExport(AddUri("job1", "nbd://h/a"), Soon());
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_FALSE(same->created());
  EXPECT_EQ(same->export_info().generation(), a->export_info().generation());
  auto other = admin_.AddExport(AddUri("job1", "nbd://h/b"), Soon());
  EXPECT_THAT(other, StatusIs(absl::StatusCode::kAlreadyExists));
  auto bad = admin_.AddExport(AddUri("job2", "ftp://h/b"), Soon());
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(admin_.AddExport(v1::AddExportRequest(), Soon()),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(AdminServiceTest, NotReadyIsUnavailableAndCanBeRolledBack) {
  auto stays = admin_.AddExport(AddUri("slow", "nbd://down/a"), Soon());
  EXPECT_THAT(stays, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_NE(registry_.Find("slow"), nullptr);  // keeps reconnecting
  v1::AddExportRequest r = AddUri("gone", "nbd://down/b");
  r.set_remove_on_failure(true);
  auto rolled = admin_.AddExport(r, Soon());
  EXPECT_THAT(rolled, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_NE(rolled.status().message().find("removed again"), std::string::npos);
  EXPECT_EQ(registry_.Find("gone"), nullptr);
}

// The answer leaves before the caller's deadline, with the cause: a
// reply at the deadline would reach the caller as a bare
// DEADLINE_EXCEEDED.
TEST_F(AdminServiceTest, NotReadyAnswersBeforeTheDeadline) {
  v1::AddExportRequest r = AddUri("late", "nbd://down/c");
  r.set_remove_on_failure(true);
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  auto got = admin_.AddExport(r, deadline);
  EXPECT_THAT(got, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_LE(absl::Now(), deadline - absl::Milliseconds(100));
  EXPECT_EQ(registry_.Find("late"), nullptr);
}

TEST_F(AdminServiceTest, RemoveThenReAddGetsANewGeneration) {
  auto a = admin_.AddExport(AddUri("job", "nbd://h/a"), Soon());
  ASSERT_TRUE(a.ok());
  v1::RemoveExportRequest rm;
  rm.set_name("job");
  auto removed = admin_.RemoveExport(rm, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(removed->generation(), a->export_info().generation());
  EXPECT_FALSE(registry_.Draining("job"));  // returned after the drain
  EXPECT_THAT(admin_.RemoveExport(rm, Soon()),
              StatusIs(absl::StatusCode::kNotFound));
  auto again = admin_.AddExport(AddUri("job", "nbd://h/a"), Soon());
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->created());
  EXPECT_GT(again->export_info().generation(), a->export_info().generation());
}

TEST_F(AdminServiceTest, UpdateAndListShowOrigin) {
  v1::ServerConfig file;
  auto* f = file.add_exports();
  f->set_name("from-file");
  f->set_nbd_uri("nbd://h/f");
  ASSERT_TRUE(registry_.ApplyFile(file, Soon()).ok());
  ASSERT_TRUE(admin_.AddExport(AddUri("from-api", "nbd://h/a"), Soon()).ok());
  v1::UpdateExportRequest u;
  *u.mutable_config() = AddUri("from-api", "nbd://h/a").config();
  u.mutable_config()->set_description("nightly");
  auto updated = admin_.UpdateExport(u);
  ASSERT_TRUE(updated.ok()) << updated.status();
  EXPECT_EQ(updated->export_info().config().description(), "nightly");
  u.mutable_config()->set_nbd_uri("nbd://h/other");
  EXPECT_THAT(admin_.UpdateExport(u),
              StatusIs(absl::StatusCode::kInvalidArgument));
  auto list = admin_.ListExports();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->exports_size(), 2);
  EXPECT_EQ(list->exports(0).config().name(), "from-api");
  EXPECT_EQ(list->exports(0).origin(), v1::EXPORT_ORIGIN_API);
  EXPECT_EQ(list->exports(1).config().name(), "from-file");
  EXPECT_EQ(list->exports(1).origin(), v1::EXPORT_ORIGIN_FILE);
}

TEST(AdminAccessTest, UnixSocketOrListedIdentityOnly) {
  std::string who;
  EXPECT_TRUE(AdminCallAllowed("unix:/run/blockmeta/grpc.sock", {}, {}, &who));
  EXPECT_EQ(who, "unix socket");
  EXPECT_FALSE(AdminCallAllowed("ipv4:127.0.0.1:4242", {}, {"backup"}, &who));
  EXPECT_FALSE(AdminCallAllowed("ipv4:10.0.0.2:4242", {"reader.example"},
                                {"backup.example"}, &who));
  EXPECT_EQ(who, "reader.example");
  EXPECT_TRUE(AdminCallAllowed("ipv6:[::1]:4242",
                               {"spiffe://x/reader", "backup.example"},
                               {"backup.example"}, &who));
  EXPECT_EQ(who, "backup.example");
}

}  // namespace
}  // namespace blockmeta
