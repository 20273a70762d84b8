// server/common/config.cc — see config.h.
#include "server/common/config.h"

#include <errno.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/errno_text.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace blockmeta {
namespace {

class Collector : public google::protobuf::io::ErrorCollector {
 public:
  explicit Collector(absl::string_view source) : source_(source) {}
  // Lines and columns arrive 0-based.
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors_.push_back(
        absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column,
                  const std::string& message) override {
    AddError(line, column, message);  // warnings are errors here
  }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

}  // namespace

absl::StatusOr<blockmeta::v1::ServerConfig> ParseServerConfig(
    absl::string_view text, absl::string_view source) {
  Collector collector(source);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&collector);
  blockmeta::v1::ServerConfig config;
  const bool ok = parser.ParseFromString(std::string(text), &config);
  if (!ok || !collector.errors().empty()) {
    std::string msg = absl::StrJoin(collector.errors(), "\n");
    if (msg.empty()) msg = absl::StrCat(source, ": cannot parse");
    return absl::InvalidArgumentError(msg);
  }
  return config;
}

absl::StatusOr<blockmeta::v1::ServerConfig> LoadServerConfig(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    std::string msg =
        absl::StrCat("cannot read config ", path, ": ", ErrnoText(err));
    if (err == EACCES) return absl::PermissionDeniedError(msg);
    return absl::NotFoundError(msg);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("error reading ", path));
  }
  return ParseServerConfig(ss.str(), path);
}

}  // namespace blockmeta
