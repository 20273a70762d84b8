// server/common/log.h — structured logging for blockmeta.
//
// One event per line on stderr, either JSON (default; for log pipelines)
// or "key=value" text (for people). Every line has ts, level and event;
// callers add fields such as request_id, export, code, latency_us:
//
//   LogInfo("rpc_done", {{"request_id", id}, {"code", "OK"}});
//
// Each line is written with one write(2), so lines from concurrent threads
// never interleave. Cost: one string build and one syscall per event; the
// data path logs only per RPC / per connection, never per extent.
// Thread-safety: all functions are thread-safe.
#ifndef BLOCKMETA_SERVER_COMMON_LOG_H_
#define BLOCKMETA_SERVER_COMMON_LOG_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace blockmeta {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kJson, kText };

// A field value: strings are quoted/escaped, numbers and bools are not.
class LogValue {
 public:
  LogValue(absl::string_view s) : text_(s), quoted_(true) {}           // NOLINT
  LogValue(const std::string& s) : text_(s), quoted_(true) {}          // NOLINT
  LogValue(const char* s) : text_(s), quoted_(true) {}                 // NOLINT
  LogValue(bool b) : text_(b ? "true" : "false"), quoted_(false) {}    // NOLINT
  LogValue(int v) : text_(std::to_string(v)), quoted_(false) {}        // NOLINT
  LogValue(long v) : text_(std::to_string(v)), quoted_(false) {}       // NOLINT
  LogValue(long long v) : text_(std::to_string(v)), quoted_(false) {}  // NOLINT
  LogValue(unsigned v) : text_(std::to_string(v)), quoted_(false) {}   // NOLINT
  LogValue(unsigned long v)                                            // NOLINT
      : text_(std::to_string(v)), quoted_(false) {}
  LogValue(unsigned long long v)  // NOLINT
      : text_(std::to_string(v)), quoted_(false) {}
  LogValue(double v) : text_(std::to_string(v)), quoted_(false) {}  // NOLINT

  const std::string& text() const { return text_; }
  bool quoted() const { return quoted_; }

 private:
  std::string text_;
  bool quoted_;
};

using LogField = std::pair<absl::string_view, LogValue>;

void SetLogFormat(LogFormat format);
void SetLogLevel(LogLevel min_level);
// Parses "debug"/"info"/"warning"/"error"; false otherwise.
bool ParseLogLevel(absl::string_view s, LogLevel* out);
// Parses "json"/"text"; false if neither.
bool ParseLogFormat(absl::string_view s, LogFormat* out);

void Log(LogLevel level, absl::string_view event,
         std::initializer_list<LogField> fields = {});
inline void LogDebug(absl::string_view e,
                     std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kDebug, e, f);
}
inline void LogInfo(absl::string_view e,
                    std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kInfo, e, f);
}
inline void LogWarning(absl::string_view e,
                       std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kWarning, e, f);
}
inline void LogError(absl::string_view e,
                     std::initializer_list<LogField> f = {}) {
  Log(LogLevel::kError, e, f);
}

// Formats one line (without writing it); exposed for tests.
std::string FormatLogLine(LogFormat format, LogLevel level,
                          absl::string_view event,
                          std::initializer_list<LogField> fields,
                          absl::string_view timestamp);

// A process-unique request id such as "r-5f3a-000017".
std::string NewRequestId();

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_LOG_H_
