// tests/testing/fake_blockmeta_server.cc — see fake_blockmeta_server.h.
#include "tests/testing/fake_blockmeta_server.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace blockmeta::client::testing {
namespace {

namespace v1 = ::blockmeta::v1;

// The extent containing `offset` in `context`, clipped to [offset, end).
v1::Extent ExtentAt(const std::string& context, uint64_t offset, uint64_t end) {
  v1::Extent e;
  e.set_offset(offset);
  if (absl::StartsWith(context, "qemu:dirty-bitmap:")) {
    uint64_t unit = 1 << 20;
    uint64_t idx = offset / unit;
    e.set_length(std::min((idx + 1) * unit, end) - offset);
    bool dirty = idx % 2 == 1;
    e.set_dirty(dirty);
    e.set_nbd_flags(dirty ? 1 : 0);
  } else {
    uint64_t idx = offset / kExtentSize;
    e.set_length(std::min((idx + 1) * kExtentSize, end) - offset);
    bool hole = idx % 2 == 1;
    e.set_hole(hole);
    e.set_zero(hole);
    e.set_nbd_flags(hole ? 3 : 0);
  }
  return e;
}

// A multi-context extent at `offset`: split where any context changes,
// with every context's flags (as the real server merges them).
v1::Extent MergedAt(const std::vector<std::string>& contexts, uint64_t offset,
                    uint64_t end) {
  v1::Extent out;
  out.set_offset(offset);
  uint64_t stop = end;
  std::vector<v1::Extent> each;
  for (const std::string& c : contexts) {
    each.push_back(ExtentAt(c, offset, end));
    stop = std::min(stop, offset + each.back().length());
  }
  out.set_length(stop - offset);
  bool dirty_set = false;
  for (size_t i = 0; i < each.size(); ++i) {
    v1::ContextFlags* f = out.add_contexts();
    f->set_nbd_flags(each[i].nbd_flags());
    f->set_hole(each[i].hole());
    f->set_zero(each[i].zero());
    f->set_dirty(each[i].dirty());
    if (absl::StartsWith(contexts[i], "qemu:dirty-bitmap:")) {
      if (!dirty_set) out.set_dirty(each[i].dirty());
      dirty_set = true;
    } else {
      out.set_hole(each[i].hole());
      out.set_zero(each[i].zero());
    }
  }
  out.set_nbd_flags(each.front().nbd_flags());
  return out;
}

grpc::Status CheckRange(const std::string& name, const std::string& context,
                        uint64_t offset, std::string* ctx_out) {
  if (name != "disk") {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("unknown export \"", name, "\""));
  }
  std::string ctx = context.empty() ? "base:allocation" : context;
  if (ctx != "base:allocation" && ctx != "qemu:dirty-bitmap:b1") {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("context \"", ctx, "\" not offered"));
  }
  if (offset >= kDiskSize) {
    return grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                        absl::StrCat("offset ", offset, " is past the end"));
  }
  *ctx_out = ctx;
  return grpc::Status::OK;
}

}  // namespace

grpc::Status FakeBlockMeta::ListExports(grpc::ServerContext*,
                                        const v1::ListExportsRequest*,
                                        v1::ListExportsResponse* resp) {
  if (unary_delay_ms > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(unary_delay_ms));
  }
  if (unary_code != 0) {
    return grpc::Status(static_cast<grpc::StatusCode>(unary_code.load()),
                        "injected");
  }
  v1::ExportSummary* e = resp->add_exports();
  e->set_name("disk");
  e->set_description("fake disk");
  e->set_state(v1::EXPORT_STATE_READY);
  e->set_size(kDiskSize);
  return grpc::Status::OK;
}

grpc::Status FakeBlockMeta::GetExportInfo(grpc::ServerContext*,
                                          const v1::GetExportInfoRequest* req,
                                          v1::ExportInfo* resp) {
  if (req->export_name() != "disk") {
    return grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("unknown export \"", req->export_name(), "\""));
  }
  resp->set_name("disk");
  resp->set_description("fake disk");
  resp->set_state(v1::EXPORT_STATE_READY);
  resp->set_size(kDiskSize);
  resp->set_minimum_block_size(1);
  resp->set_preferred_block_size(4096);
  resp->set_maximum_block_size(32 << 20);
  resp->set_read_only(true);
  resp->set_can_flush(true);
  resp->add_metadata_contexts("base:allocation");
  resp->add_metadata_contexts("qemu:dirty-bitmap:b1");
  resp->set_upstream("fake://");
  return grpc::Status::OK;
}

grpc::Status FakeBlockMeta::GetExtents(grpc::ServerContext*,
                                       const v1::GetExtentsRequest* req,
                                       v1::GetExtentsResponse* resp) {
  ++get_extents_calls;
  std::string ctx;
  grpc::Status s =
      CheckRange(req->export_name(), req->context(), req->offset(), &ctx);
  if (!s.ok()) return s;
  if (req->length() == 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "zero length");
  }
  uint64_t end = std::min(kDiskSize, req->offset() + req->length());
  uint64_t at = req->offset();
  uint32_t max = req->max_extents() == 0 ? 1024 : req->max_extents();
  while (at < end && static_cast<uint32_t>(resp->extents_size()) < max) {
    *resp->add_extents() = ExtentAt(ctx, at, end);
    at += resp->extents(resp->extents_size() - 1).length();
    if (req->one_extent()) break;
  }
  resp->set_next_offset(at);
  resp->set_export_size(kDiskSize);
  resp->set_context(ctx);
  resp->set_cache_outcome(v1::CACHE_OUTCOME_HIT);
  return grpc::Status::OK;
}

grpc::Status FakeBlockMeta::MapExtents(
    grpc::ServerContext* context, const v1::MapExtentsRequest* req,
    grpc::ServerWriter<v1::MapExtentsResponse>* writer) {
  ++map_calls;
  std::string ctx;
  std::vector<std::string> contexts;  // a multi-context request
  for (const std::string& c : req->contexts()) {
    grpc::Status s = CheckRange(req->export_name(), c, req->offset(), &ctx);
    if (!s.ok()) return s;
    contexts.push_back(ctx);
  }
  grpc::Status s =
      contexts.empty()
          ? CheckRange(req->export_name(), req->context(), req->offset(), &ctx)
          : grpc::Status::OK;
  if (!s.ok()) return s;
  if (!contexts.empty()) ctx = contexts[0];
  uint64_t end = req->length() == 0
                     ? kDiskSize
                     : std::min(kDiskSize, req->offset() + req->length());
  uint32_t batch = req->batch_size() == 0 ? 4 : req->batch_size();
  bool fail = false, stall = false;
  for (int n = fail_streams.load(); n > 0;) {
    if (fail_streams.compare_exchange_weak(n, n - 1)) {
      fail = true;
      break;
    }
  }
  if (!fail) {
    for (int n = stall_streams.load(); n > 0;) {
      if (stall_streams.compare_exchange_weak(n, n - 1)) {
        stall = true;
        break;
      }
    }
  }
  uint64_t at = req->offset();
  int batches = 0;
  while (at < end) {
    if (fail && batches == fail_after_batches) {
      return grpc::Status(static_cast<grpc::StatusCode>(fail_code.load()),
                          "injected failure");
    }
    if (stall && batches == stall_after) {
      for (int i = 0; i < stall_ms / 10 && !context->IsCancelled(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (context->IsCancelled()) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
    }
    v1::MapExtentsResponse resp;
    while (at < end && static_cast<uint32_t>(resp.extents_size()) < batch) {
      *resp.add_extents() = contexts.empty() ? ExtentAt(ctx, at, end)
                                             : MergedAt(contexts, at, end);
      at += resp.extents(resp.extents_size() - 1).length();
    }
    if (send_gap && batches == 1) {
      resp.mutable_extents(0)->set_offset(resp.extents(0).offset() + 512);
    }
    resp.set_next_offset(at);
    resp.set_export_size(kDiskSize);
    resp.set_context(ctx);
    for (const std::string& c : contexts) resp.add_contexts(c);
    if (!writer->Write(resp)) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    }
    ++batches;
  }
  return grpc::Status::OK;
}

grpc::Status FakeBlockMeta::InvalidateCache(
    grpc::ServerContext*, const v1::InvalidateCacheRequest* req,
    v1::InvalidateCacheResponse* resp) {
  if (!req->export_name().empty() && req->export_name() != "disk") {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown export");
  }
  resp->set_extents_dropped(3);
  resp->set_bytes_dropped(3 * kExtentSize);
  return grpc::Status::OK;
}

grpc::Status FakeBlockMeta::GetStats(grpc::ServerContext*,
                                     const v1::GetStatsRequest* req,
                                     v1::GetStatsResponse* resp) {
  if (!req->export_name().empty() && req->export_name() != "disk") {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown export");
  }
  resp->mutable_total()->set_hits(7);
  resp->mutable_total()->set_misses(2);
  resp->set_memory_limit_bytes(256 << 20);
  v1::ExportStats* e = resp->add_exports();
  e->set_export_name("disk");
  (*e->mutable_contexts())["base:allocation"].set_hits(7);
  e->set_upstream_calls(2);
  return grpc::Status::OK;
}

FakeServer::FakeServer(const std::string& unix_path,
                       const std::string& cert_pem, const std::string& key_pem,
                       const std::string& client_ca_pem) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (!cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl(
        client_ca_pem.empty()
            ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_root_certs = client_ca_pem;
    ssl.pem_key_cert_pairs.push_back({key_pem, cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  } else {
    creds = grpc::InsecureServerCredentials();
  }
  int port = 0;
  if (unix_path.empty()) {
    builder.AddListeningPort("127.0.0.1:0", creds, &port);
  } else {
    builder.AddListeningPort("unix:" + unix_path, creds);
  }
  builder.RegisterService(&service_);
  server_ = builder.BuildAndStart();
  address_ = unix_path.empty() ? absl::StrCat("127.0.0.1:", port)
                               : "unix:" + unix_path;
}

FakeServer::~FakeServer() { Shutdown(); }

void FakeServer::SetServing(bool serving) {
  server_->GetHealthCheckService()->SetServingStatus(serving);
}

void FakeServer::Shutdown() {
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(200));
    server_->Wait();
    server_.reset();
  }
}

}  // namespace blockmeta::client::testing
