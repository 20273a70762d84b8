// tests/testing/fake_blockmeta_server.h — test only: an in-process BlockMeta +
// health gRPC server on 127.0.0.1:0 (or a Unix socket) serving one synthetic
// export, with fault injection for the client's retry logic. Not a model of the
// real server's cache; integration tests use //server:blockmetad.
//
// The export "disk" (size kDiskSize) has 64 KiB extents alternating data
// (type 0) and hole,zero (type 3); context "qemu:dirty-bitmap:b1" has
// alternating clean/dirty 1 MiB extents. MapExtents sends `batch_size`
// extents per message (default 4) without coalescing.
//
// Thread-safety: the fault knobs may be set from the test thread while RPCs
// run; they are atomics.
#ifndef BLOCKMETA_TESTS_TESTING_FAKE_BLOCKMETA_SERVER_H_
#define BLOCKMETA_TESTS_TESTING_FAKE_BLOCKMETA_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>

#include "blockmeta/v1/blockmeta.grpc.pb.h"

namespace blockmeta::client::testing {

inline constexpr uint64_t kDiskSize = 16 << 20;
inline constexpr uint64_t kExtentSize = 64 << 10;

class FakeBlockMeta final : public blockmeta::v1::BlockMeta::Service {
 public:
  // Fault injection for MapExtents: the next `fail_streams` streams send
  // `fail_after_batches` batches, then end with `fail_code`.
  std::atomic<int> fail_streams{0};
  std::atomic<int> fail_after_batches{1};
  std::atomic<int> fail_code{static_cast<int>(grpc::StatusCode::UNAVAILABLE)};
  // The next `stall_streams` streams stop sending after `stall_after` batches
  // for `stall_ms` (longer than the client's deadline).
  std::atomic<int> stall_streams{0};
  std::atomic<int> stall_after{1};
  std::atomic<int> stall_ms{0};
  // Send a batch that skips 512 bytes (contract violation).
  std::atomic<bool> send_gap{false};
  // ListExports sleeps this long first.
  std::atomic<int> unary_delay_ms{0};
  // Every unary call fails with this code when not OK.
  std::atomic<int> unary_code{0};
  // Counters.
  std::atomic<int> map_calls{0};
  std::atomic<int> get_extents_calls{0};

  grpc::Status ListExports(grpc::ServerContext*,
                           const blockmeta::v1::ListExportsRequest*,
                           blockmeta::v1::ListExportsResponse*) override;
  grpc::Status GetExportInfo(grpc::ServerContext*,
                             const blockmeta::v1::GetExportInfoRequest*,
                             blockmeta::v1::ExportInfo*) override;
  grpc::Status GetExtents(grpc::ServerContext*,
                          const blockmeta::v1::GetExtentsRequest*,
                          blockmeta::v1::GetExtentsResponse*) override;
  grpc::Status MapExtents(
      grpc::ServerContext*, const blockmeta::v1::MapExtentsRequest*,
      grpc::ServerWriter<blockmeta::v1::MapExtentsResponse>*) override;
  grpc::Status InvalidateCache(
      grpc::ServerContext*, const blockmeta::v1::InvalidateCacheRequest*,
      blockmeta::v1::InvalidateCacheResponse*) override;
  grpc::Status GetStats(grpc::ServerContext*,
                        const blockmeta::v1::GetStatsRequest*,
                        blockmeta::v1::GetStatsResponse*) override;
};

// Owns a running server. Address() is "127.0.0.1:PORT" or "unix:PATH".
class FakeServer {
 public:
  // Listens on 127.0.0.1:0, or on unix:`unix_path` when given. With
  // cert/key PEM given, serves TLS (and requires client certificates
  // signed by `client_ca_pem` when that is set).
  explicit FakeServer(const std::string& unix_path = "",
                      const std::string& cert_pem = "",
                      const std::string& key_pem = "",
                      const std::string& client_ca_pem = "");
  ~FakeServer();

  const std::string& address() const { return address_; }
  FakeBlockMeta& service() { return service_; }
  // Health status of the overall server ("").
  void SetServing(bool serving);
  void Shutdown();

 private:
  FakeBlockMeta service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace blockmeta::client::testing

#endif  // BLOCKMETA_TESTS_TESTING_FAKE_BLOCKMETA_SERVER_H_
