// tests/testing/nbd_map.cc — see nbd_map.h.
#include "tests/testing/nbd_map.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "tests/testing/nbd_process.h"
#include "tool_output.pb.h"

namespace blockmeta::testing {
namespace {

template <typename Message>
absl::Status ParseJson(const std::string& json, Message* out) {
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  auto s = google::protobuf::util::JsonStringToMessage(json, out, options);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad tool JSON: ", s.ToString(), ": ", json.substr(0, 200)));
  }
  return absl::OkStatus();
}

absl::Status CheckContiguous(const ExtentList& list) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].length == 0) {
      return absl::InvalidArgumentError("zero-length extent");
    }
    if (i > 0 && list[i].offset != list[i - 1].end()) {
      return absl::InvalidArgumentError(absl::StrCat("gap before extent ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExtentList> ParseNbdinfoMapJson(const std::string& json) {
  NbdinfoMapJson map;
  absl::Status s = ParseJson(absl::StrCat("{\"items\":", json, "}"), &map);
  if (!s.ok()) return s;
  ExtentList out;
  for (const NbdinfoExtent& e : map.items()) {
    out.push_back({e.offset(), e.length(), e.type()});
  }
  s = CheckContiguous(out);
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<ExtentList> ParseQemuImgMapJson(const std::string& json) {
  QemuImgMapJson map;
  absl::Status s = ParseJson(absl::StrCat("{\"items\":", json, "}"), &map);
  if (!s.ok()) return s;
  ExtentList out;
  for (const QemuImgExtent& e : map.items()) {
    const uint32_t flags =
        (e.data() ? 0 : kStateHole) | (e.zero() ? kStateZero : 0);
    out.push_back({e.start(), e.length(), flags});
  }
  s = CheckContiguous(out);
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<ExtentList> NbdinfoMap(const std::string& uri,
                                      const std::string& context) {
  absl::StatusOr<std::string> out =
      RunCommand({"nbdinfo", absl::StrCat("--map=", context), "--json", uri});
  if (!out.ok()) return out.status();
  return ParseNbdinfoMapJson(*out);
}

absl::StatusOr<ExtentList> QemuImgMap(const std::string& path,
                                      const std::string& format) {
  absl::StatusOr<std::string> out =
      RunCommand({"qemu-img", "map", "--output=json", "-f", format, path});
  if (!out.ok()) return out.status();
  return ParseQemuImgMapJson(*out);
}

absl::StatusOr<NbdinfoExport> ParseNbdinfoJson(const std::string& json) {
  NbdinfoInfo info;
  absl::Status s = ParseJson(json, &info);
  if (!s.ok()) return s;
  if (info.exports_size() == 0) {
    return absl::InvalidArgumentError("nbdinfo JSON has no exports");
  }
  const NbdinfoInfoExport& ex = info.exports(0);
  NbdinfoExport out;
  out.size = ex.export_size();
  out.read_only = ex.is_read_only();
  out.can_multi_conn = ex.can_multi_conn();
  out.contexts.assign(ex.contexts().begin(), ex.contexts().end());
  std::sort(out.contexts.begin(), out.contexts.end());
  out.minimum_block_size = ex.block_size_minimum();
  out.preferred_block_size = ex.block_size_preferred();
  out.maximum_block_size = ex.block_size_maximum();
  return out;
}

absl::StatusOr<NbdinfoExport> Nbdinfo(const std::string& uri) {
  absl::StatusOr<std::string> out = RunCommand({"nbdinfo", "--json", uri});
  if (!out.ok()) return out.status();
  return ParseNbdinfoJson(*out);
}

ExtentList MergeAdjacent(const ExtentList& extents) {
  ExtentList out;
  for (const Extent& e : extents) {
    if (!out.empty() && out.back().end() == e.offset &&
        out.back().flags == e.flags) {
      out.back().length += e.length;
    } else {
      out.push_back(e);
    }
  }
  return out;
}

ExtentList Slice(const ExtentList& extents, uint64_t offset, uint64_t length) {
  ExtentList out;
  const uint64_t end = offset + length;
  for (const Extent& e : extents) {
    uint64_t s = std::max(e.offset, offset);
    uint64_t t = std::min(e.end(), end);
    if (s < t) out.push_back({s, t - s, e.flags});
  }
  return out;
}

}  // namespace blockmeta::testing
