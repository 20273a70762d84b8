// client/export_commands.cc — see export_commands.h.
#include "client/export_commands.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/quote.h"

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
    return absl::StrCat("--", k, ": not a number: ", QuoteBounded(it->second));
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

namespace {

int RunExport(CommandContext& ctx) {
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  const std::vector<std::string>& pos = ctx.positional();
  const std::string& verb = pos[0];
  std::ostream& out = ctx.out();
  if (verb == "list") {
    if (pos.size() != 1) return ctx.Usage("export list takes no NAME");
    absl::StatusOr<v1::AdminListExportsResponse> r =
        ctx.client().AdminListExports();
    if (!r.ok()) return ctx.Fail("ListExports", r.status());
    if (json) {
      out << CommandContext::ProtoJson(*r);
    } else {
      for (const v1::AdminExport& e : r->exports()) PrintAdminExport(out, e);
    }
    return kExitOk;
  }
  if (pos.size() != 2) {
    return ctx.Usage(absl::StrCat("export ", verb, " needs NAME"));
  }
  const std::string& name = pos[1];
  if (verb == "add") {
    v1::AddExportRequest req;
    if (auto e =
            ExportConfigFromFlags(name, ctx.flags(), req.mutable_config())) {
      return ctx.Usage(*e);
    }
    absl::StatusOr<v1::AddExportResponse> r = ctx.client().AddExport(req);
    if (!r.ok()) return ctx.Fail("AddExport", r.status());
    if (json) {
      out << CommandContext::ProtoJson(*r);
    } else {
      out << (r->created() ? "added " : "already present ");
      PrintAdminExport(out, r->export_info());
    }
    return kExitOk;
  }
  if (verb == "remove") {
    absl::StatusOr<v1::RemoveExportResponse> r =
        ctx.client().RemoveExport(name);
    if (!r.ok()) return ctx.Fail("RemoveExport", r.status());
    if (json) {
      out << CommandContext::ProtoJson(*r);
    } else {
      out << "removed " << name << " generation=" << r->generation() << "\n";
    }
    return kExitOk;
  }
  return ctx.Usage(absl::StrCat("unknown export action ", QuoteBounded(verb),
                                " (expected add, remove or list)"));
}

}  // namespace

CommandSpec ExportCommand() {
  return {"export",
          "add|remove|list [NAME]",
          "add or remove an export of a running server (Admin API)",
          "Admin calls are served only over the server's gRPC Unix socket "
          "(--server=unix:PATH) or to an mTLS identity in admin_identities. "
          "add waits until the upstream is READY; adding the same config "
          "again is OK, another config for the name is ALREADY_EXISTS. "
          "remove ends the export's streams and NBD sessions and frees its "
          "cache.",
          1,
          2,
          {{"uri", "URI", "add: an NBD URI upstream"},
           {"image", "PATH", "add: a raw/qcow2 image served by qemu-nbd"},
           {"format", "FMT", "add --image: raw or qcow2 (default: by name)"},
           {"bitmap", "B[,B...]", "add --image: qcow2 dirty bitmaps to export"},
           {"image-read-only", "", "add --image: qemu-nbd --read-only"},
           {"command", "ARGV",
            "add: an NBD server command, e.g. \"nbdkit "
            "memory 1G\""},
           {"description", "TEXT", "add: description"},
           {"read-only", "", "add: refuse writes through the NBD shim"},
           {"connections", "N", "add: upstream connections"},
           {"upstream-timeout-ms", "N", "add: timeout of one upstream call"},
           {"cache-ttl-seconds", "N", "add: cache TTL override"},
           kOutputBasicFlag},
          &RunExport};
}

}  // namespace blockmeta::client
