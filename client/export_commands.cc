// client/export_commands.cc — see export_commands.h.
#include "client/export_commands.h"

#include <cstdint>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;

bool Has(const std::map<std::string, std::string>& f, const std::string& k) {
  return f.count(k) != 0;
}

std::optional<std::string> Uint(const std::map<std::string, std::string>& f,
                                const std::string& k, uint32_t* out) {
  auto it = f.find(k);
  if (it == f.end()) return std::nullopt;
  if (!absl::SimpleAtoi(it->second, out)) {
    return absl::StrCat("--", k, ": not a number: \"", it->second, "\"");
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> ExportConfigFromFlags(
    const std::string& name, const std::map<std::string, std::string>& flags,
    v1::ExportConfig* out) {
  out->set_name(name);
  const int kinds =
      Has(flags, "uri") + Has(flags, "image") + Has(flags, "command");
  if (kinds != 1) {
    return "give exactly one of --uri=URI, --image=PATH, --command=ARGV";
  }
  if (Has(flags, "uri")) out->set_nbd_uri(flags.at("uri"));
  if (Has(flags, "image")) {
    v1::ImageUpstream* img = out->mutable_image();
    img->set_path(flags.at("image"));
    if (Has(flags, "format")) img->set_format(flags.at("format"));
    if (Has(flags, "bitmap")) {
      for (absl::string_view b :
           absl::StrSplit(flags.at("bitmap"), ',', absl::SkipEmpty())) {
        img->add_bitmaps(std::string(b));
      }
    }
    if (Has(flags, "image-read-only")) img->set_read_only(true);
  } else if (Has(flags, "format") || Has(flags, "bitmap") ||
             Has(flags, "image-read-only")) {
    return "--format, --bitmap and --image-read-only need --image";
  }
  if (Has(flags, "command")) {
    for (absl::string_view a :
         absl::StrSplit(flags.at("command"), ' ', absl::SkipEmpty())) {
      out->mutable_command()->add_argv(std::string(a));
    }
    if (out->command().argv_size() == 0) return "--command: empty";
  }
  if (Has(flags, "description")) out->set_description(flags.at("description"));
  if (Has(flags, "read-only")) out->set_read_only(true);
  uint32_t v = 0;
  if (auto e = Uint(flags, "connections", &v)) return e;
  if (Has(flags, "connections")) out->set_connections(v);
  if (auto e = Uint(flags, "upstream-timeout-ms", &v)) return e;
  if (Has(flags, "upstream-timeout-ms")) out->set_upstream_timeout_ms(v);
  if (auto e = Uint(flags, "cache-ttl-seconds", &v)) return e;
  if (Has(flags, "cache-ttl-seconds")) out->set_cache_ttl_seconds(v);
  return std::nullopt;
}

void PrintAdminExport(std::ostream& o, const v1::AdminExport& e) {
  o << e.config().name() << " "
    << (e.state() == v1::EXPORT_STATE_READY ? "READY" : "UNAVAILABLE") << " "
    << (e.origin() == v1::EXPORT_ORIGIN_API ? "api" : "file")
    << " generation=" << e.generation();
  if (!e.last_error().empty()) o << " (" << e.last_error() << ")";
  o << "\n";
}

}  // namespace blockmeta::client
