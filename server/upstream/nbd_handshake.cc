// server/upstream/nbd_handshake.cc — see nbd_handshake.h.
#include "server/upstream/nbd_handshake.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "server/cache/extent.h"
#include "server/upstream/nbd_errors.h"

namespace blockmeta {

absl::StatusOr<nbd_handle*> StartConnect(const std::string& uri,
                                         const std::string& socket_path) {
  nbd_handle* h = nbd_create();
  if (h == nullptr) return StatusFromNbdError("nbd_create");
  auto fail = [h](absl::string_view what) {
    absl::Status s = StatusFromNbdError(what);
    nbd_close(h);
    return s;
  };
  if (nbd_set_opt_mode(h, true) == -1) return fail("opt mode");
  int r;
  if (!uri.empty()) {
    // The URI comes from the operator's configuration, not from a client:
    // let it name local files (nbds:// ...&tls-certificates=DIR or
    // tls-psk-file=FILE), which libnbd refuses by default.
    if (nbd_set_uri_allow_local_file(h, true) == -1) {
      return fail("uri allow local file");
    }
    r = nbd_aio_connect_uri(h, uri.c_str());
  } else {
    r = nbd_aio_connect_unix(h, socket_path.c_str());
  }
  if (r == -1) return fail("connect");
  return h;
}

int Handshake::OnOptDone(void* user_data, int* error) {
  auto* d = static_cast<OptDone*>(user_data);
  d->done = true;
  d->error = *error;
  return 1;
}

int Handshake::OnContext(void* user_data, const char* name) {
  static_cast<std::vector<std::string>*>(user_data)->push_back(name);
  return 0;
}

absl::Status Handshake::Dead(absl::string_view notify_error) const {
  if (!notify_error.empty()) {
    return absl::UnavailableError(absl::StrCat("handshake: ", notify_error));
  }
  return absl::UnavailableError("connection closed during handshake");
}

absl::StatusOr<bool> Handshake::Advance(absl::string_view notify_error) {
  while (true) {
    if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
      return Dead(notify_error);
    }
    switch (phase_) {
      case Phase::kConnecting:
        if (nbd_aio_is_connecting(h_) == 1) return false;
        if (nbd_aio_is_negotiating(h_) == 1) {
          absl::Status s = StartList();
          if (!s.ok()) return s;
          continue;
        }
        if (nbd_aio_is_ready(h_) == 1) {  // no option negotiation
          requested_ = {std::string(kBaseAllocation)};
          absl::Status s = Fill();
          if (!s.ok()) return s;
          return true;
        }
        return Dead(notify_error);
      case Phase::kListing: {
        if (!list_done_.done) return false;
        absl::Status s = StartGo();
        if (!s.ok()) return s;
        continue;
      }
      case Phase::kGoing: {
        if (!go_done_.done) return false;
        if (go_done_.error != 0) {
          return StatusFromErrno(go_done_.error, "NBD_OPT_GO refused", "");
        }
        if (nbd_aio_is_ready(h_) != 1) {
          return absl::UnavailableError("handshake did not complete");
        }
        absl::Status s = Fill();
        if (!s.ok()) return s;
        return true;
      }
      case Phase::kReady:
        return true;
    }
  }
}

absl::Status Handshake::StartList() {
  // Discover the contexts on offer (an empty query lists them all). A
  // server that cannot list still gets base:allocation requested.
  phase_ = Phase::kListing;
  if (nbd_clear_meta_contexts(h_) == -1 ||
      nbd_aio_opt_list_meta_context(
          h_, nbd_context_callback{OnContext, &offered_, nullptr},
          nbd_completion_callback{OnOptDone, &list_done_, nullptr}) == -1) {
    list_done_.done = true;
  }
  return absl::OkStatus();
}

absl::Status Handshake::StartGo() {
  phase_ = Phase::kGoing;
  requested_ = {std::string(kBaseAllocation)};
  for (const std::string& c : offered_) {
    if (IsDirtyBitmapContext(c) && c.size() > kDirtyBitmapPrefix.size() &&
        std::find(requested_.begin(), requested_.end(), c) ==
            requested_.end()) {
      requested_.push_back(c);
    }
  }
  nbd_clear_meta_contexts(h_);
  for (const std::string& c : requested_) {
    if (nbd_add_meta_context(h_, c.c_str()) == -1) {
      return StatusFromNbdError("add meta context");
    }
  }
  if (nbd_aio_opt_go(
          h_, nbd_completion_callback{OnOptDone, &go_done_, nullptr}) == -1) {
    return StatusFromNbdError("opt go");
  }
  return absl::OkStatus();
}

absl::Status Handshake::Fill() {
  phase_ = Phase::kReady;
  const int64_t size = nbd_get_size(h_);
  if (size < 0) return StatusFromNbdError("get size");
  info_.size = static_cast<uint64_t>(size);
  const int64_t bmin = nbd_get_block_size(h_, LIBNBD_SIZE_MINIMUM);
  const int64_t bpref = nbd_get_block_size(h_, LIBNBD_SIZE_PREFERRED);
  const int64_t bmax = nbd_get_block_size(h_, LIBNBD_SIZE_MAXIMUM);
  if (bmin > 0) info_.minimum_block_size = static_cast<uint32_t>(bmin);
  if (bpref > 0) info_.preferred_block_size = static_cast<uint32_t>(bpref);
  if (bmax > 0) {
    info_.maximum_block_size = static_cast<uint32_t>(bmax);
    info_.maximum_block_size_advertised = true;
  }
  info_.read_only = nbd_is_read_only(h_) == 1;
  info_.can_trim = nbd_can_trim(h_) == 1;
  info_.can_zero = nbd_can_zero(h_) == 1;
  info_.can_fast_zero = nbd_can_fast_zero(h_) == 1;
  info_.can_flush = nbd_can_flush(h_) == 1;
  info_.can_fua = nbd_can_fua(h_) == 1;
  info_.can_multi_conn = nbd_can_multi_conn(h_) == 1;
  info_.can_cache = nbd_can_cache(h_) == 1;
  for (const std::string& c : requested_) {
    if (nbd_can_meta_context(h_, c.c_str()) == 1) info_.contexts.push_back(c);
  }
  return absl::OkStatus();
}

}  // namespace blockmeta
