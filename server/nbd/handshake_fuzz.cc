// server/nbd/handshake_fuzz.cc — libFuzzer target for the shim's input
// path: the bytes a client sends are run through the handshake, then
// parsed, validated and (when valid) handled as transmission requests
// against an in-memory upstream and the real ExtentCache.
//
// Built two ways: as a plain cc_test with handshake_fuzz_main.cc (replays
// fuzz_corpus/, seeded from real nbdinfo / qemu-img / qemu-io / nbdcopy
// sessions, plus deterministic mutations of it), and with clang
// -fsanitize=fuzzer,address,undefined by tests/fuzz/run_fuzz.sh.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "server/cache/extent_cache.h"
#include "server/nbd/handler.h"
#include "server/nbd/handshake.h"
#include "server/nbd/request.h"
#include "server/nbd/stream.h"
#include "tests/testing/fake_upstream.h"

namespace {

using namespace blockmeta;       // NOLINT
using namespace blockmeta::nbd;  // NOLINT

struct World {
  World() : a(1 << 20, 4096, true), b(1 << 16, 512, false) {
    a.Fill(0, 8192, 'a');
    b.mutable_info().minimum_block_size = 512;
    exports.push_back({"a", "export a", a_ref, false, absl::Seconds(1)});
    exports.push_back({"b", "", b_ref, true, absl::Seconds(1)});
    options.max_payload_bytes = 1 << 16;
    // STARTTLS is accepted; the "TLS" stream is the same memory stream, so
    // inputs reach the upgrade and the state reset after it.
    options.tls = TlsMode::kAllow;
  }
  FakeUpstream a, b;
  const std::shared_ptr<Upstream> a_ref = Unowned(&a), b_ref = Unowned(&b);
  std::vector<ShimExport> exports;
  HandshakeOptions options;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static World* world = new World();
  MemoryStream stream(
      std::string_view(reinterpret_cast<const char*>(data), size));
  StartTlsFn start_tls = [&stream]() -> absl::StatusOr<ByteStream*> {
    return &stream;
  };
  absl::StatusOr<Negotiated> n =
      RunHandshake(stream, world->exports, world->options, start_tls);
  if (!n.ok()) return 0;
  // A fresh cache per input keeps runs independent.
  ExtentCache cache(ExtentCache::Options{});
  RequestHandler handler(*n, &cache);
  for (int i = 0; i < 256; ++i) {
    uint8_t hdr[kRequestHeaderSize];
    if (!stream.ReadFull(hdr, sizeof hdr).ok()) break;
    Request r;
    if (!ParseRequestHeader(hdr, &r)) break;
    Verdict v = ValidateRequest(r, *n);
    if (v.disconnect) break;
    std::string payload;
    if (v.payload > 0) {
      if (v.payload > stream.remaining()) break;
      payload.resize(v.payload);
      if (!stream.ReadFull(payload.data(), payload.size()).ok()) break;
    }
    if (v.error != 0) {
      std::string reply =
          ErrorReply(n->structured_replies, r.handle, v.error, v.reason);
      if (reply.size() < kSimpleReplyHeaderSize) __builtin_trap();
      continue;
    }
    std::string reply = handler.Handle(r, std::move(payload));
    if (reply.size() < kSimpleReplyHeaderSize) __builtin_trap();
  }
  return 0;
}
