// tests/deploy/config_check.cc — parses blockmeta.v1.ServerConfig text
// protos the way blockmetad reads --config (google::protobuf::TextFormat,
// unknown fields rejected) and prints each as one line of JSON with the
// proto field names, so deploy tests can assert on the parsed values.
//
// Usage: config_check FILE...   ("-" reads standard input)
// Exit status: 0 when every file parses; 1 on the first that does not (the
// parser's line:column message goes to stderr); 2 on a usage error.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "blockmeta/v1/config.pb.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace {

// Collects parse errors as "FILE:LINE:COLUMN: message" lines.
class Collector : public google::protobuf::io::ErrorCollector {
 public:
  explicit Collector(std::string file) : file_(std::move(file)) {}
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors_ << file_ << ":" << line + 1 << ":" << column + 1 << ": " << message
            << "\n";
  }
  std::string errors() const { return errors_.str(); }

 private:
  std::string file_;
  std::ostringstream errors_;
};

bool ReadAll(const std::string& path, std::string* out) {
  std::ostringstream buffer;
  if (path == "-") {
    buffer << std::cin.rdbuf();
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) return false;
    buffer << in.rdbuf();
  }
  *out = buffer.str();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: config_check FILE...\n";
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    const std::string path = argv[i];
    std::string text;
    if (!ReadAll(path, &text)) {
      std::cerr << path << ": cannot read\n";
      return 1;
    }
    blockmeta::v1::ServerConfig config;
    Collector collector(path);
    google::protobuf::TextFormat::Parser parser;
    parser.RecordErrorsTo(&collector);
    if (!parser.ParseFromString(text, &config)) {
      std::cerr << collector.errors();
      return 1;
    }
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    std::string json;
    const auto status =
        google::protobuf::util::MessageToJsonString(config, &json, options);
    if (!status.ok()) {
      std::cerr << path << ": " << status.ToString() << "\n";
      return 1;
    }
    std::cout << json << "\n";
  }
  return 0;
}
