// client/units.h — parsing and printing of the quantities the blockmeta CLI
// takes and shows: byte sizes ("512k", "1G", "1.5GiB"), human sizes
// ("1.5 GiB") and timeouts ("30s", "500ms", "2").
//
// All functions are pure, thread-safe and allocation-light; none touches
// global state.
#ifndef BLOCKMETA_CLIENT_UNITS_H_
#define BLOCKMETA_CLIENT_UNITS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace blockmeta::client {

// Parses a byte count: decimal digits, an optional fraction, and an optional
// binary suffix K, M, G, T, P or E (any case; "KiB", "KB" and "K" mean the
// same, 1024-based), or "B"/nothing for bytes. "1.5G" is 1610612736; the
// value must be a whole number of bytes. INVALID_ARGUMENT for anything else,
// including overflow past 2^64 - 1, negative numbers and empty strings.
absl::StatusOr<uint64_t> ParseSize(absl::string_view text);

// Formats bytes for people: "0 B", "512 B", "1.0 KiB", "1.5 GiB" (one
// decimal, 1024-based, largest unit that keeps the number >= 1).
std::string FormatSize(uint64_t bytes);

// Parses a timeout: an absl duration ("30s", "500ms", "1m30s") or a plain
// number of seconds ("2", "0.5"). Must be > 0. INVALID_ARGUMENT otherwise.
absl::StatusOr<absl::Duration> ParseTimeout(absl::string_view text);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_UNITS_H_
