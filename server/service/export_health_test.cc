// server/service/export_health_test.cc — the health rule of each service
// name over a registry of fake upstreams: per-export status from the
// moment of the add to the moment of the removal, and an aggregate that an
// export added later joins only once it was ready.
#include "server/service/export_health.h"

#include <map>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "tests/testing/fake_upstream.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

class ExportHealthTest : public ::testing::Test {
 protected:
  ExportHealthTest()
      : registry_([this](const v1::ExportConfig& c)
                      -> absl::StatusOr<std::unique_ptr<Upstream>> {
          auto up = std::make_unique<FakeUpstream>(1 << 20, 4096, false);
          up->set_ready(start_ready_);
          fakes_[c.name()] = up.get();
          return up;
        }),
        health_(&registry_) {}

  void Add(const std::string& name, bool ready) {
    start_ready_ = ready;
    v1::ExportConfig c;
    c.set_name(name);
    c.set_nbd_uri("nbd+unix:///?socket=/nonexistent");
    ASSERT_TRUE(registry_.Add(c, ExportOrigin::kApi).ok());
  }
  HealthStatus Aggregate() { return health_.Status(kBlockMetaHealthService); }
  HealthStatus Of(const std::string& name) {
    return health_.Status(ExportHealthServiceName(name));
  }

  bool start_ready_ = true;
  std::map<std::string, FakeUpstream*> fakes_;  // owned by registry_
  ExportRegistry registry_;
  ExportHealth health_;
};

TEST_F(ExportHealthTest, NamesAndUnknownServices) {
  EXPECT_EQ(ExportHealthServiceName("disk"), "blockmeta.v1.BlockMeta/disk");
  EXPECT_EQ(health_.Status(""), HealthStatus::kServing);
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);  // no exports
  EXPECT_EQ(Of("disk"), HealthStatus::kUnknown);
  EXPECT_EQ(health_.Status("blockmeta.v1.BlockMetadisk"),
            HealthStatus::kUnknown);
  EXPECT_EQ(health_.Status("grpc.health.v1.Health"), HealthStatus::kUnknown);
  EXPECT_EQ(health_.Status("blockmeta.v1.BlockMeta/"), HealthStatus::kUnknown);
}

TEST_F(ExportHealthTest, PerExportFromAddToRemove) {
  Add("disk", /*ready=*/false);
  EXPECT_EQ(Of("disk"), HealthStatus::kNotServing);
  fakes_["disk"]->set_ready(true);
  EXPECT_EQ(Of("disk"), HealthStatus::kServing);
  absl::StatusOr<ExportRef> gone = registry_.Remove("disk");
  ASSERT_TRUE(gone.ok());
  health_.Forget((*gone)->generation);
  EXPECT_EQ(Of("disk"), HealthStatus::kUnknown);
}

TEST_F(ExportHealthTest, StartupExportsCountAtOnce) {
  Add("a", /*ready=*/false);
  health_.CountCurrentExports();
  EXPECT_EQ(Aggregate(), HealthStatus::kNotServing);
  fakes_["a"]->set_ready(true);
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);
}

TEST_F(ExportHealthTest, LaterExportJoinsTheAggregateOnceReady) {
  Add("a", /*ready=*/true);
  health_.CountCurrentExports();
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);
  // An admin add still connecting leaves the aggregate alone ...
  Add("b", /*ready=*/false);
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);
  EXPECT_EQ(Of("b"), HealthStatus::kNotServing);
  // ... until it was seen ready once; from then on it counts.
  fakes_["b"]->set_ready(true);
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);
  fakes_["b"]->set_ready(false);
  EXPECT_EQ(Aggregate(), HealthStatus::kNotServing);
  // A removed export no longer counts.
  absl::StatusOr<ExportRef> gone = registry_.Remove("b");
  ASSERT_TRUE(gone.ok());
  health_.Forget((*gone)->generation);
  EXPECT_EQ(Aggregate(), HealthStatus::kServing);
  // A counted export that drops turns the aggregate NOT_SERVING.
  fakes_["a"]->set_ready(false);
  EXPECT_EQ(Aggregate(), HealthStatus::kNotServing);
}

TEST_F(ExportHealthTest, ReadySeenThroughItsOwnServiceCounts) {
  health_.CountCurrentExports();
  Add("c", /*ready=*/true);
  EXPECT_EQ(Of("c"), HealthStatus::kServing);  // seen ready here
  fakes_["c"]->set_ready(false);
  EXPECT_EQ(Aggregate(), HealthStatus::kNotServing);
}

}  // namespace
}  // namespace blockmeta
