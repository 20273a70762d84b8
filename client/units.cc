// client/units.cc — see units.h.
#include "client/units.h"

#include <cctype>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

absl::Status BadSize(absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("invalid size ", QuoteBounded(text), ": ", why,
                   " (expected e.g. 4096, 512k, 1G, 1.5GiB)"));
}

}  // namespace

absl::StatusOr<uint64_t> ParseSize(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  if (s.empty()) return BadSize(text, "empty");
  size_t i = 0;
  // Whole part.
  unsigned __int128 whole = 0;
  size_t digits = 0;
  while (i < s.size() && absl::ascii_isdigit(s[i])) {
    whole = whole * 10 + static_cast<unsigned>(s[i] - '0');
    if (whole > std::numeric_limits<uint64_t>::max()) {
      return BadSize(text, "too large");
    }
    ++i;
    ++digits;
  }
  // Fraction, kept as numerator / denominator.
  unsigned __int128 frac_num = 0, frac_den = 1;
  if (i < s.size() && s[i] == '.') {
    ++i;
    size_t frac_digits = 0;
    while (i < s.size() && absl::ascii_isdigit(s[i])) {
      if (frac_digits < 18) {
        frac_num = frac_num * 10 + static_cast<unsigned>(s[i] - '0');
        frac_den *= 10;
      }
      ++i;
      ++frac_digits;
    }
    if (frac_digits == 0) return BadSize(text, "missing digits after '.'");
  }
  if (digits == 0) return BadSize(text, "not a number");
  // Suffix.
  absl::string_view suffix = s.substr(i);
  int shift = 0;
  if (!suffix.empty()) {
    switch (absl::ascii_tolower(suffix[0])) {
      case 'b':
        shift = 0;
        if (suffix.size() != 1) return BadSize(text, "unknown suffix");
        suffix = "";
        break;
      case 'k':
        shift = 10;
        break;
      case 'm':
        shift = 20;
        break;
      case 'g':
        shift = 30;
        break;
      case 't':
        shift = 40;
        break;
      case 'p':
        shift = 50;
        break;
      case 'e':
        shift = 60;
        break;
      default:
        return BadSize(text, "unknown suffix");
    }
    if (!suffix.empty()) {
      absl::string_view rest = suffix.substr(1);
      if (!(rest.empty() || rest == "B" || rest == "b" || rest == "iB" ||
            rest == "ib")) {
        return BadSize(text, "unknown suffix");
      }
    }
  }
  unsigned __int128 scaled = whole << shift;
  if (scaled > std::numeric_limits<uint64_t>::max()) {
    return BadSize(text, "too large");
  }
  unsigned __int128 frac_bytes = (frac_num << shift);
  if (frac_bytes % frac_den != 0) {
    return BadSize(text, "not a whole number of bytes");
  }
  scaled += frac_bytes / frac_den;
  if (scaled > std::numeric_limits<uint64_t>::max()) {
    return BadSize(text, "too large");
  }
  return static_cast<uint64_t>(scaled);
}

std::string FormatSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB",
                                           "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double v = static_cast<double>(bytes);
  int unit = -1;
  while (v >= 1024.0 && unit < 5) {
    v /= 1024.0;
    ++unit;
  }
  // 1023.96 KiB would print as "1024.0 KiB"; move to the next unit instead.
  if (v >= 1023.95 && unit < 5) {
    v /= 1024.0;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", v, kUnits[unit]);
}

absl::StatusOr<absl::Duration> ParseTimeout(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  absl::Duration d;
  double seconds;
  if (absl::SimpleAtod(s, &seconds) && !s.empty() &&
      (absl::ascii_isdigit(s.back()) || s.back() == '.')) {
    d = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(s, &d)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid timeout ", QuoteBounded(text),
                     " (expected e.g. 30s, 500ms, 1m or a number of "
                     "seconds)"));
  }
  if (d <= absl::ZeroDuration() || d == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid timeout ", QuoteBounded(text), ": must be > 0 and finite"));
  }
  return d;
}

}  // namespace blockmeta::client
