// server/common/log.cc — see log.h.
#include "server/common/log.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockmeta {
namespace {

std::atomic<LogFormat> g_format{LogFormat::kJson};
std::atomic<LogLevel> g_level{LogLevel::kInfo};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

void AppendJsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (c < 0x20) {
          absl::StrAppendFormat(out, "\\u%04x", c);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void AppendTextValue(std::string* out, const LogValue& v) {
  bool needs_quotes = v.text().empty() ||
                      v.text().find_first_of(" \"=\t\n") != std::string::npos;
  if (v.quoted() && needs_quotes) {
    AppendJsonString(out, v.text());
  } else {
    out->append(v.text());
  }
}

}  // namespace

void SetLogFormat(LogFormat format) { g_format.store(format); }
void SetLogLevel(LogLevel min_level) { g_level.store(min_level); }

bool ParseLogLevel(absl::string_view s, LogLevel* out) {
  for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning,
                     LogLevel::kError}) {
    if (s == LevelName(l)) {
      *out = l;
      return true;
    }
  }
  return false;
}

bool ParseLogFormat(absl::string_view s, LogFormat* out) {
  if (s == "json") {
    *out = LogFormat::kJson;
    return true;
  }
  if (s == "text") {
    *out = LogFormat::kText;
    return true;
  }
  return false;
}

// Longer field values are cut to this many bytes plus a marker, so no
// input (a 15 MiB export name, an upstream's error text) makes a huge line.
constexpr size_t kMaxLogFieldBytes = 1024;

// `v`, or a cut copy of it in `*storage` when it is too long.
const LogValue& Bounded(const LogValue& v, LogValue* storage) {
  if (!v.quoted() || v.text().size() <= kMaxLogFieldBytes) return v;
  *storage = LogValue(absl::StrCat(v.text().substr(0, kMaxLogFieldBytes),
                                   "...(", v.text().size(), " bytes)"));
  return *storage;
}

std::string FormatLogLine(LogFormat format, LogLevel level,
                          absl::string_view event,
                          std::initializer_list<LogField> fields,
                          absl::string_view timestamp) {
  std::string line;
  line.reserve(128);
  if (format == LogFormat::kJson) {
    line.append("{\"ts\":");
    AppendJsonString(&line, timestamp);
    line.append(",\"level\":");
    AppendJsonString(&line, LevelName(level));
    line.append(",\"event\":");
    AppendJsonString(&line, event);
    for (const LogField& f : fields) {
      line.push_back(',');
      AppendJsonString(&line, f.first);
      line.push_back(':');
      LogValue cut("");
      if (f.second.quoted()) {
        AppendJsonString(&line, Bounded(f.second, &cut).text());
      } else {
        line.append(f.second.text());
      }
    }
    line.append("}\n");
  } else {
    absl::StrAppend(&line, timestamp, " ", LevelName(level), " ", event);
    for (const LogField& f : fields) {
      absl::StrAppend(&line, " ", f.first, "=");
      LogValue cut("");
      AppendTextValue(&line, Bounded(f.second, &cut));
    }
    line.push_back('\n');
  }
  return line;
}

void Log(LogLevel level, absl::string_view event,
         std::initializer_list<LogField> fields) {
  if (level < g_level.load(std::memory_order_relaxed)) return;
  std::string ts = absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(),
                                    absl::UTCTimeZone());
  std::string line = FormatLogLine(g_format.load(std::memory_order_relaxed),
                                   level, event, fields, ts);
  // One write per line: lines from different threads never interleave.
  ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

std::string NewRequestId() {
  static const uint32_t kProcessTag =
      static_cast<uint32_t>(::getpid()) ^
      static_cast<uint32_t>(absl::ToUnixNanos(absl::Now()));
  static std::atomic<uint64_t> counter{0};
  return absl::StrFormat("r-%04x-%06d", kProcessTag & 0xffff,
                         counter.fetch_add(1, std::memory_order_relaxed) + 1);
}

}  // namespace blockmeta
