// server/nbd/handshake.h — the NBD fixed newstyle handshake (option
// haggling) of the shim, run over a ByteStream.
//
// RunHandshake() sends the greeting, then answers options until the client
// enters transmission (NBD_OPT_GO / NBD_OPT_EXPORT_NAME), aborts, or breaks
// a rule that forces a hard disconnect. Supported: EXPORT_NAME, ABORT,
// LIST, INFO/GO (NBD_INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE),
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
// (`base:allocation` plus the upstream's `qemu:dirty-bitmap:*`) and
// STARTTLS (when HandshakeOptions::tls allows it; else NBD_REP_ERR_POLICY);
// anything else gets NBD_REP_ERR_UNSUP.
//
// TLS: after the STARTTLS ack the StartTlsFn runs the TLS handshake and
// returns the stream to use; every negotiated option is then forgotten
// (nbdkit CVE-2021-3716). With TlsMode::kRequire every option before TLS
// but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, and EXPORT_NAME a
// hang-up (doc/proto.md "forced TLS").
//
// Invariants (the NBD spec, doc/proto.md "Option haggling", and the CVEs
// below):
// * Option payloads above HandshakeOptions::max_option_length are never
//   read or allocated (CVE-2017-15119): the client gets NBD_REP_ERR_TOO_BIG
//   and a hard disconnect.
// * Export names and context names above 4096 bytes are refused
//   (CVE-2022-26495).
// * No upstream I/O happens here: exports are described from
//   Upstream::Info(), a cached value (CVE-2019-14850), read only through
//   the ExportGateFn.
// * The entered export is recorded (ExportGateFn with enter) before the
//   final reply of GO / EXPORT_NAME is sent.
// * SET_META_CONTEXT before STRUCTURED_REPLY gets NBD_REP_ERR_INVALID;
//   every SET replaces the previous selection, even when it fails.
//
// Cost: one pass over each option; no per-connection state beyond the
// Negotiated result. Thread-safety: RunHandshake is reentrant; the exports
// it reads are constant.
#ifndef BLOCKMETA_SERVER_NBD_HANDSHAKE_H_
#define BLOCKMETA_SERVER_NBD_HANDSHAKE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/nbd/stream.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace nbd {

// Default NBD_INFO_BLOCK_SIZE maximum (nbd.max_payload_bytes): what
// libnbd and qemu send at most.
inline constexpr uint32_t kDefaultMaxPayloadBytes = 32u << 20;

// Default of ShimExport::invalidate_granularity (and of
// nbd.invalidate_granularity_bytes): filesystem blocks, qcow2 clusters up
// to 2 MiB, dirty bitmaps of the default 64 KiB granularity.
inline constexpr uint64_t kDefaultInvalidateGranularity = 2u << 20;

// One export as the shim serves it. Constant after the server starts.
struct ShimExport {
  std::string name;
  std::string description;
  // The registry entry owns the upstream; the shim's export lists only
  // point at it, so a list a connection negotiated against never keeps a
  // removed export's upstream alive. Locked per use; expired once the
  // export was removed and its last user let go. A session that entered
  // the export holds it (Connection) until the session ends.
  std::weak_ptr<Upstream> upstream;
  bool read_only = false;  // ExportConfig.read_only
  absl::Duration upstream_timeout = absl::Seconds(30);
  // A write, trim or zero forgets cached knowledge rounded out to this
  // (a power of two): the upstream reports allocation per filesystem block
  // or qcow2 cluster and dirty bitmaps per granularity, so the bytes
  // around a sub-block write change too. NbdServer sets it per export
  // (ExportInvalidateGranularity).
  uint64_t invalidate_granularity = kDefaultInvalidateGranularity;
};

enum class TlsMode { kOff, kAllow, kRequire };

// Runs the TLS server handshake over the connection's socket; returns the
// stream that carries the rest of the session, or an error (hang up).
using StartTlsFn = std::function<absl::StatusOr<ByteStream*>()>;

// The handshake's only way to an export's upstream: returns its
// UpstreamInfo (for INFO, GO, EXPORT_NAME and the meta-context options).
// With `enter` (GO, EXPORT_NAME) an OK answer also records that the client
// enters `e`, before any reply to that option is sent; so whoever removes
// an export never misses a session that is about to enter it. An error
// refuses the export (NBD_REP_ERR_UNKNOWN, or a hang-up for EXPORT_NAME).
// Null: e.upstream's Info() (NOT_FOUND once it expired), nothing recorded.
using ExportGateFn = std::function<absl::StatusOr<UpstreamInfo>(
    const ShimExport& e, bool enter)>;

struct HandshakeOptions {
  TlsMode tls = TlsMode::kOff;
  // Largest option payload read (bigger ones: ERR_TOO_BIG + disconnect).
  uint32_t max_option_length = 64 * 1024;
  // Largest READ/WRITE payload (NBD_INFO_BLOCK_SIZE maximum).
  uint32_t max_payload_bytes = kDefaultMaxPayloadBytes;
};

struct MetaContext {
  uint32_t id = 0;
  std::string name;
};

// What the client and the shim agreed on; input of the transmission phase.
struct Negotiated {
  const ShimExport* export_entry = nullptr;
  UpstreamInfo info;  // snapshot taken when the client entered
  uint16_t transmission_flags = 0;
  bool structured_replies = false;
  bool no_zeroes = false;
  // Contexts selected by the last SET_META_CONTEXT, if it named the export
  // the client entered (else empty: BLOCK_STATUS then gets EINVAL).
  std::vector<MetaContext> contexts;
  uint32_t min_block_size = 1;
  uint32_t max_payload = kDefaultMaxPayloadBytes;
  bool tls = false;  // the session runs over TLS
};

// The contexts the shim offers for an upstream, in id order (ids are the
// index + 1): base:allocation, then the upstream's qemu:dirty-bitmap:*.
std::vector<std::string> OfferedContexts(const UpstreamInfo& info);

// Transmission flags advertised for an export.
uint16_t TransmissionFlags(const UpstreamInfo& info, bool config_read_only,
                           bool structured_replies);

// Runs the handshake on `stream`. `exports` must be sorted by name.
// Returns the negotiated state when the client entered transmission;
// CANCELLED when the client sent NBD_OPT_ABORT; INVALID_ARGUMENT for a
// protocol violation that ends the session (bad magic, unknown client
// flags, bad EXPORT_NAME, oversized option); the stream's error when it
// broke or timed out.
absl::StatusOr<Negotiated> RunHandshake(ByteStream& stream,
                                        const std::vector<ShimExport>& exports,
                                        const HandshakeOptions& options,
                                        const StartTlsFn& start_tls = nullptr,
                                        const ExportGateFn& gate = nullptr);

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_HANDSHAKE_H_
