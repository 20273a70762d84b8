// client/blockmeta_client.h — the C++ client library of blockmeta
// (//client:blockmeta_client): connect to a blockmeta server and ask it
// about exports and their extents.
//
//   ClientOptions opts;
//   opts.target = "unix:/run/blockmeta.sock";
//   auto client = BlockMetaClient::Connect(opts);       // no I/O yet
//   auto exports = (*client)->ListExports();
//   v1::MapExtentsRequest req;
//   req.set_export_name("disk0");
//   auto it = (*client)->MapExtents(req);
//   v1::Extent e;
//   while (true) {
//     absl::StatusOr<bool> more = it->Next(&e);
//     if (!more.ok()) { /* final error */ break; }
//     if (!*more) break;                                 // range complete
//     use(e);
//   }
//
// Errors are absl::Status with the server's gRPC code and message (the
// numeric codes agree): NOT_FOUND unknown export, OUT_OF_RANGE past the end,
// UNAVAILABLE server unreachable or upstream down, and so on (see
// proto/blockmeta/v1/blockmeta.proto). Unary calls are not retried; the
// ExtentIterator is (see below).
//
// Thread-safety: BlockMetaClient is thread-safe (calls may run concurrently
// from any number of threads over one HTTP/2 connection). An ExtentIterator
// belongs to one thread at a time. Cost: each unary call is one RPC; a map
// is one stream plus one per resume.
#ifndef BLOCKMETA_CLIENT_BLOCKMETA_CLIENT_H_
#define BLOCKMETA_CLIENT_BLOCKMETA_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockmeta/v1/admin.pb.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "client/client_options.h"

namespace blockmeta::client {

namespace v1 = ::blockmeta::v1;

// grpc.health.v1 serving status.
enum class ServingStatus { kUnknown, kServing, kNotServing };
const char* ServingStatusName(ServingStatus status);

// Whether an error may go away by itself (retry with backoff): UNAVAILABLE,
// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED.
bool IsTransient(const absl::Status& status);

// Whether a failed call never reached a server: UNAVAILABLE because the
// connection was refused or failed (nothing listens at the target, a
// missing socket file, an unreachable host) or the server went away. An
// UNAVAILABLE the server itself answered (e.g. an export's upstream is
// down) is not: the server is there and may succeed later.
bool IsServerUnreachable(const absl::Status& status);

// Iterates over the extents of a MapExtents range as one contiguous,
// complete sequence: the first extent starts at the requested offset, each
// next one where the previous ended, and a clean end (Next() returns false)
// means the whole range was covered.
//
// Behind the scenes it reads the server's stream batch by batch. After a
// transient error (see IsTransient; a batch not arriving within the client
// deadline counts as DEADLINE_EXCEEDED; a reset stream shows as UNAVAILABLE)
// it waits with exponential backoff and reopens the stream from the last
// batch's next_offset, at most RetryPolicy::max_attempts consecutive
// failures. Extents already returned are never returned again, so a resume
// may split one run of equal flags into two adjacent extents.
//
// A server breaking the stream contract (a gap, an overlap, an empty extent,
// a clean end before the range end) yields INTERNAL; it is not retried.
class ExtentIterator {
 public:
  virtual ~ExtentIterator() = default;

  // Fills `*extent` and returns true, or returns false once the range is
  // complete, or returns the final error. After false or an error, further
  // calls return the same. Blocks for the network.
  virtual absl::StatusOr<bool> Next(v1::Extent* extent) = 0;

  // End of the extents returned so far (the request's offset at first).
  virtual uint64_t position() const = 0;
  // End of the range: min(offset + length, export size); 0 until the first
  // batch arrived.
  virtual uint64_t range_end() const = 0;
  // Size of the export and context name, as the server reported them; 0 /
  // "" until the first batch arrived.
  virtual uint64_t export_size() const = 0;
  virtual const std::string& context() const = 0;
  // Streams reopened after transient errors so far.
  virtual int resumes() const = 0;
};

class BlockMetaClient {
 public:
  // Validates `options` and prepares a channel. No network I/O: an
  // unreachable server shows up as UNAVAILABLE on the first call.
  // INVALID_ARGUMENT for malformed options, NOT_FOUND / PERMISSION_DENIED
  // for unreadable TLS files.
  static absl::StatusOr<std::unique_ptr<BlockMetaClient>> Connect(
      const ClientOptions& options);

  virtual ~BlockMetaClient() = default;

  virtual absl::StatusOr<v1::ListExportsResponse> ListExports() = 0;
  virtual absl::StatusOr<v1::ExportInfo> GetExportInfo(
      absl::string_view export_name) = 0;
  // One GetExtents call (may stop early; see next_offset in the proto).
  virtual absl::StatusOr<v1::GetExtentsResponse> GetExtents(
      const v1::GetExtentsRequest& request) = 0;
  virtual absl::StatusOr<v1::InvalidateCacheResponse> InvalidateCache(
      const v1::InvalidateCacheRequest& request) = 0;
  // Stats of one export, or of all when `export_name` is empty.
  virtual absl::StatusOr<v1::GetStatsResponse> GetStats(
      absl::string_view export_name) = 0;
  // grpc.health.v1.Health/Check of `service` ("" is the whole server).
  // NOT_FOUND when the server does not know the service.
  virtual absl::StatusOr<ServingStatus> Health(absl::string_view service) = 0;
  // A resumable iterator over MapExtents(request). Never null; errors
  // (including invalid requests) surface from Next().
  virtual std::unique_ptr<ExtentIterator> MapExtents(
      const v1::MapExtentsRequest& request) = 0;
  // One GetTotals call: bytes of the range that are data, hole, zero,
  // dirty, ... per context (see ContextTotals in the proto). All or
  // nothing; a cold multi-TiB export may need a longer deadline than the
  // default (ClientOptions::deadline). The default answers UNIMPLEMENTED
  // (for fakes).
  virtual absl::StatusOr<v1::GetTotalsResponse> GetTotals(
      const v1::GetTotalsRequest& request);

  // blockmeta.v1.Admin (served only over the gRPC Unix socket or to an
  // mTLS admin identity: PERMISSION_DENIED otherwise). The defaults answer
  // UNIMPLEMENTED (for fakes).
  virtual absl::StatusOr<v1::AddExportResponse> AddExport(
      const v1::AddExportRequest& request);
  virtual absl::StatusOr<v1::RemoveExportResponse> RemoveExport(
      absl::string_view name);
  virtual absl::StatusOr<v1::AdminListExportsResponse> AdminListExports();

  const ClientOptions& options() const { return options_; }

 protected:
  explicit BlockMetaClient(ClientOptions options)
      : options_(std::move(options)) {}

 private:
  const ClientOptions options_;
};

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_BLOCKMETA_CLIENT_H_
