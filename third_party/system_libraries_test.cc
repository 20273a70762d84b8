// third_party/system_libraries_test.cc — every wrapped system library
// compiles, links and runs: protobuf + gRPC codegen (ours and the health
// proto), gRPC reflection, libnbd, Abseil containers and synchronization.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <libnbd.h>

#include "absl/container/btree_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpc/health/v1/health.pb.h"
TEST(SystemLibrariesTest, LinkAndRun) {
  blockmeta::v1::Extent e;
  e.set_offset(1);
  grpc::health::v1::HealthCheckRequest r;
  absl::btree_map<int, int> m;
  m[1] = 2;
  absl::Mutex mu;
  absl::MutexLock l(&mu);
  struct nbd_handle* h = nbd_create();
  ASSERT_NE(h, nullptr);
  nbd_close(h);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  absl::StatusOr<int> s = 3;
  EXPECT_TRUE(s.ok());
}
