// server/upstream/nbd_handshake.h — one libnbd handle from "created" to
// "ready", driven without blocking (by the engine's events).
//
// StartConnect makes a handle in option mode and starts connecting to an
// NBD URI or a Unix socket. Handshake::Advance, called after every event on
// the handle, walks the negotiation:
//   connecting → NBD_OPT_LIST_META_CONTEXT with an empty query (what does
//   the server offer?) → request base:allocation plus every
//   qemu:dirty-bitmap:* offered → NBD_OPT_GO → ready, then records what was
//   negotiated (size, block sizes, flags, the contexts the server actually
//   selected per nbd_can_meta_context). Servers that cannot list still get
//   base:allocation requested; servers without option negotiation (oldstyle)
//   go straight to ready.
//
// Invariants: the OptDone records the libnbd callbacks write live in the
// Handshake, which must outlive the handle's pending options (the owner
// closes the handle before destroying the Handshake). Advance never blocks
// and never holds a lock; deadlines are the caller's business.
//
// Thread-safety: not thread-safe; one thread at a time (the engine calls a
// handle's callbacks one at a time).
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_HANDSHAKE_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_HANDSHAKE_H_

#include <libnbd.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

// Creates a handle and starts connecting to `uri` (when non-empty; the URI
// may name local TLS files, since it comes from the operator) or to the
// Unix socket `socket_path`. On error nothing is left open.
absl::StatusOr<nbd_handle*> StartConnect(const std::string& uri,
                                         const std::string& socket_path);

class Handshake {
 public:
  explicit Handshake(nbd_handle* h) : h_(h) {}
  Handshake(const Handshake&) = delete;
  Handshake& operator=(const Handshake&) = delete;

  // True once the handle is ready (then info() is complete), false while
  // the handshake goes on, an error when it failed. `notify_error` is the
  // message of a failed libnbd notify on this handle, if any.
  absl::StatusOr<bool> Advance(absl::string_view notify_error);

  // Negotiated info; `description` is left empty and `read_only` is what the
  // server said.
  const UpstreamInfo& info() const { return info_; }

 private:
  // One option request's completion, written by libnbd's callback.
  struct OptDone {
    bool done = false;
    int error = 0;
  };
  static int OnOptDone(void* user_data, int* error);
  static int OnContext(void* user_data, const char* name);

  absl::Status StartList();
  absl::Status StartGo();
  absl::Status Fill();
  absl::Status Dead(absl::string_view notify_error) const;

  enum class Phase { kConnecting, kListing, kGoing, kReady };
  nbd_handle* const h_;
  Phase phase_ = Phase::kConnecting;
  OptDone list_done_;
  OptDone go_done_;
  std::vector<std::string> offered_;
  std::vector<std::string> requested_;
  UpstreamInfo info_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_HANDSHAKE_H_
