// common/quote.h — the one way an error message or log line quotes a
// string a caller chose (export names, contexts, paths, URIs, ids, CLI
// arguments): in double quotes, C-escaped (so control bytes and quotes
// cannot forge or break a message), and bounded. Only the first
// kMaxQuotedBytes bytes are shown; a longer string gets `...` and its size:
//
//   QuoteBounded("disk0")             -> "disk0"
//   QuoteBounded(std::string(1 << 20, 'a'))
//                                     -> "aaaa...aaaa"... (1048576 bytes)
//
// The result is at most 4 * kMaxQuotedBytes + 40 bytes, whatever the input
// (gRPC refuses to send a status message above its metadata limit, 8 KiB
// by default, and clients then see "received initial metadata size exceeds
// limit" instead of the error). Thread-safe, no state.
#ifndef BLOCKMETA_COMMON_QUOTE_H_
#define BLOCKMETA_COMMON_QUOTE_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace blockmeta {

inline constexpr size_t kMaxQuotedBytes = 64;

std::string QuoteBounded(absl::string_view s, size_t max = kMaxQuotedBytes);

}  // namespace blockmeta

#endif  // BLOCKMETA_COMMON_QUOTE_H_
