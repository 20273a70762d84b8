// tests/service/csi_socket_test.cc — blockmetad as a CSI snapshot-metadata
// backend, end to end, the way Kubernetes' external-snapshot-metadata
// sidecar uses it: a real BlockMetaServer whose only gRPC listener is the
// CSI driver socket (csi.socket "unix://..."), a real qemu-nbd on a qcow2
// with a persistent dirty bitmap, and the sidecar's call order on that
// socket: GetPluginInfo, Probe until ready, GetPluginCapabilities, then the
// SnapshotMetadata streams by snapshot handle (the base snapshot has no
// export). Ranges are compared with `nbdinfo --map` of each context.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "csi/v1/identity.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

// The selected extents of `map`, touching ones merged (VARIABLE_LENGTH).
Ranges Selected(const ExtentList& map, uint32_t bit, bool want_set) {
  Ranges out;
  for (const Extent& e : MergeAdjacent(map)) {
    if (((e.flags & bit) != 0) != want_set) continue;
    int64_t off = static_cast<int64_t>(e.offset);
    if (!out.empty() && out.back().first + out.back().second == off) {
      out.back().second += static_cast<int64_t>(e.length);
    } else {
      out.push_back({off, static_cast<int64_t>(e.length)});
    }
  }
  return out;
}

template <typename Msg>
grpc::Status ReadAll(grpc::ClientReader<Msg>* reader, Ranges* got,
                     int max_per_message) {
  Msg msg;
  int messages = 0;
  while (reader->Read(&msg)) {
    ++messages;
    EXPECT_LE(msg.block_metadata_size(), max_per_message);
    EXPECT_EQ(msg.block_metadata_type(), csi::v1::VARIABLE_LENGTH);
    for (const auto& b : msg.block_metadata()) {
      got->push_back({b.byte_offset(), b.size_bytes()});
    }
  }
  EXPECT_GE(messages, 1);
  return reader->Finish();
}

TEST(CsiSocketTest, TheSidecarsCallsOnTheDriverSocket) {
  TempDir tmp;
  std::string img = tmp.File("vol.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 32 * kMiB,
                        {"write -P 0x1 0 1M", "write -P 0x2 8M 2M"})
                  .ok());
  ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "ckpt-1"}).ok());
  ASSERT_TRUE(
      QemuIo(img, "qcow2", {"write -P 0x3 4M 64k", "write -P 0x4 20M 1M"})
          .ok());
  auto q = NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2",
                              "--persistent", "--shared=8", "-B", "ckpt-1",
                              "-r", img});
  ASSERT_TRUE(q.ok()) << q.status();

  std::string socket = tmp.File("csi.sock");
  v1::ServerConfig config;
  config.set_grpc_listen("");  // the CSI socket is the only listener
  config.mutable_csi()->set_socket(absl::StrCat("unix://", socket));
  config.mutable_csi()->set_driver_name("blockmeta.example.com");
  config.mutable_csi()->set_default_max_results(2);
  v1::ExportConfig* e = config.add_exports();
  e->set_name("pvc-1-snap-2");
  e->set_nbd_uri((*q)->uri());
  e->mutable_csi()->set_snapshot_id("snaphandle-2");
  (*e->mutable_csi()->mutable_base_snapshot_bitmaps())["snaphandle-1"] =
      "ckpt-1";
  auto server = ::blockmeta::testing::StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();

  auto channel = grpc::CreateChannel(absl::StrCat("unix://", socket),
                                     grpc::InsecureChannelCredentials());
  auto identity = csi::v1::Identity::NewStub(channel);
  {
    grpc::ClientContext ctx;
    csi::v1::GetPluginInfoResponse info;
    ASSERT_TRUE(identity->GetPluginInfo(&ctx, {}, &info).ok());
    EXPECT_EQ(info.name(), "blockmeta.example.com");
    EXPECT_FALSE(info.vendor_version().empty());
  }
  // Probe until ready, as the sidecar does (it polls every second).
  ASSERT_TRUE(Eventually([&] {
    grpc::ClientContext ctx;
    csi::v1::ProbeResponse probe;
    grpc::Status s = identity->Probe(&ctx, {}, &probe);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_TRUE(probe.has_ready());
    return s.ok() && probe.ready().value();
  }));
  {
    grpc::ClientContext ctx;
    csi::v1::GetPluginCapabilitiesResponse caps;
    ASSERT_TRUE(identity->GetPluginCapabilities(&ctx, {}, &caps).ok());
    bool found = false;
    for (const auto& c : caps.capabilities()) {
      found = found ||
              c.service().type() ==
                  csi::v1::PluginCapability::Service::SNAPSHOT_METADATA_SERVICE;
    }
    EXPECT_TRUE(found);
  }

  auto meta = csi::v1::SnapshotMetadata::NewStub(channel);
  absl::StatusOr<ExtentList> alloc = NbdinfoMap((*q)->uri());
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataAllocatedRequest req;
    req.set_snapshot_id("snaphandle-2");
    auto reader = meta->GetMetadataAllocated(&ctx, req);
    Ranges got;
    grpc::Status s =
        ReadAll<csi::v1::GetMetadataAllocatedResponse>(reader.get(), &got, 2);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(got, Selected(*alloc, kStateZero, false));
  }
  absl::StatusOr<ExtentList> dirty =
      NbdinfoMap((*q)->uri(), "qemu:dirty-bitmap:ckpt-1");
  ASSERT_TRUE(dirty.ok()) << dirty.status();
  Ranges want_delta = Selected(*dirty, kStateDirty, true);
  ASSERT_EQ(want_delta.size(), 2u);  // 4M+64k and 20M+1M
  {
    // The base snapshot "snaphandle-1" has no export: it resolves through
    // the target's csi.base_snapshot_bitmaps.
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id("snaphandle-1");
    req.set_target_snapshot_id("snaphandle-2");
    req.set_max_results(1);
    auto reader = meta->GetMetadataDelta(&ctx, req);
    Ranges got;
    grpc::Status s =
        ReadAll<csi::v1::GetMetadataDeltaResponse>(reader.get(), &got, 1);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(got, want_delta);
  }
  {
    // Resume after the first range, as after a broken stream.
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id("snaphandle-1");
    req.set_target_snapshot_id("snaphandle-2");
    req.set_starting_offset(want_delta[0].first + want_delta[0].second);
    auto reader = meta->GetMetadataDelta(&ctx, req);
    Ranges got;
    grpc::Status s =
        ReadAll<csi::v1::GetMetadataDeltaResponse>(reader.get(), &got, 2);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(got, Ranges(want_delta.begin() + 1, want_delta.end()));
  }
  auto code = [&](const std::string& base, const std::string& target) {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id(base);
    req.set_target_snapshot_id(target);
    auto reader = meta->GetMetadataDelta(&ctx, req);
    csi::v1::GetMetadataDeltaResponse msg;
    while (reader->Read(&msg)) {
    }
    return reader->Finish().error_code();
  };
  EXPECT_EQ(code("snaphandle-1", ""), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(code("", "snaphandle-2"), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(code("snaphandle-1", "gone"), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(code("snaphandle-0", "snaphandle-2"),
            grpc::StatusCode::FAILED_PRECONDITION);
  {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataAllocatedRequest req;  // empty snapshot_id
    auto reader = meta->GetMetadataAllocated(&ctx, req);
    csi::v1::GetMetadataAllocatedResponse msg;
    EXPECT_FALSE(reader->Read(&msg));
    EXPECT_THAT(reader->Finish(), StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  }
  (*server)->Shutdown(absl::Seconds(1));
}

TEST(CsiSocketTest, ATcpAddressIsNotACsiSocket) {
  v1::ServerConfig config;
  config.mutable_csi()->set_socket("127.0.0.1:5000");
  EXPECT_THAT(BlockMetaServer::Create(config),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace blockmeta
