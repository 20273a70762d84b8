// common/quote.cc — see quote.h.
#include "common/quote.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace blockmeta {

std::string QuoteBounded(absl::string_view s, size_t max) {
  std::string out =
      absl::StrCat("\"", absl::CHexEscape(s.substr(0, max)), "\"");
  if (s.size() > max) absl::StrAppend(&out, "... (", s.size(), " bytes)");
  return out;
}

}  // namespace blockmeta
