// common/errno_text.h — the text of an errno value, thread-safe (shared by
// the client and the server).
//
// std::strerror may return a pointer into a static buffer that another
// thread's call overwrites (POSIX leaves it not thread-safe), so
// blockmeta's threads use ErrnoText() instead. It calls strerror_r into a
// local buffer and works with both variants: the XSI one (returns int) and
// the GNU one glibc declares under _GNU_SOURCE (returns char*, possibly a
// static string). The text is the one strerror gives ("No such file or
// directory", "Unknown error 4242").
#ifndef BLOCKMETA_COMMON_ERRNO_TEXT_H_
#define BLOCKMETA_COMMON_ERRNO_TEXT_H_

#include <string.h>  // strerror_r

#include <string>

#include "absl/strings/str_cat.h"

namespace blockmeta {
namespace errno_text_internal {

// GNU strerror_r: the returned pointer is the text.
inline std::string FromResult(const char* text, const char* /*buf*/,
                              int /*err*/) {
  return text;
}
// XSI strerror_r: 0 means the buffer holds the text.
inline std::string FromResult(int rc, const char* buf, int err) {
  if (rc == 0) return buf;
  return absl::StrCat("Unknown error ", err);
}

}  // namespace errno_text_internal

inline std::string ErrnoText(int err) {
  char buf[256];
  buf[0] = '\0';
  return errno_text_internal::FromResult(strerror_r(err, buf, sizeof(buf)), buf,
                                         err);
}

}  // namespace blockmeta

#endif  // BLOCKMETA_COMMON_ERRNO_TEXT_H_
