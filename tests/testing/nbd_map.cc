// tests/testing/nbd_map.cc — see nbd_map.h.
#include "tests/testing/nbd_map.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

using google::protobuf::ListValue;
using google::protobuf::Struct;
using google::protobuf::Value;

absl::StatusOr<ListValue> ParseArray(const std::string& json) {
  ListValue list;
  auto s = google::protobuf::util::JsonStringToMessage(json, &list);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "not a JSON array: ", s.ToString(), ": ", json.substr(0, 200)));
  }
  return list;
}

absl::StatusOr<uint64_t> GetU64(const Struct& obj, const std::string& key) {
  auto it = obj.fields().find(key);
  if (it == obj.fields().end() ||
      it->second.kind_case() != Value::kNumberValue) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing number \"", key, "\""));
  }
  double d = it->second.number_value();
  if (d < 0 || d != std::floor(d) || d > 9007199254740992.0) {
    return absl::InvalidArgumentError(absl::StrCat("bad number \"", key, "\""));
  }
  return static_cast<uint64_t>(d);
}

bool GetBool(const Struct& obj, const std::string& key) {
  auto it = obj.fields().find(key);
  return it != obj.fields().end() &&
         it->second.kind_case() == Value::kBoolValue && it->second.bool_value();
}

absl::Status CheckContiguous(const ExtentList& list) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].length == 0)
      return absl::InvalidArgumentError("zero-length extent");
    if (i > 0 && list[i].offset != list[i - 1].end()) {
      return absl::InvalidArgumentError(absl::StrCat("gap before extent ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExtentList> ParseNbdinfoMapJson(const std::string& json) {
  absl::StatusOr<ListValue> list = ParseArray(json);
  if (!list.ok()) return list.status();
  ExtentList out;
  for (const Value& v : list->values()) {
    if (v.kind_case() != Value::kStructValue) {
      return absl::InvalidArgumentError("map entry is not an object");
    }
    Extent e;
    absl::StatusOr<uint64_t> off = GetU64(v.struct_value(), "offset");
    absl::StatusOr<uint64_t> len = GetU64(v.struct_value(), "length");
    absl::StatusOr<uint64_t> type = GetU64(v.struct_value(), "type");
    if (!off.ok()) return off.status();
    if (!len.ok()) return len.status();
    if (!type.ok()) return type.status();
    out.push_back({*off, *len, static_cast<uint32_t>(*type)});
  }
  absl::Status s = CheckContiguous(out);
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<ExtentList> ParseQemuImgMapJson(const std::string& json) {
  absl::StatusOr<ListValue> list = ParseArray(json);
  if (!list.ok()) return list.status();
  ExtentList out;
  for (const Value& v : list->values()) {
    if (v.kind_case() != Value::kStructValue) {
      return absl::InvalidArgumentError("map entry is not an object");
    }
    absl::StatusOr<uint64_t> start = GetU64(v.struct_value(), "start");
    absl::StatusOr<uint64_t> len = GetU64(v.struct_value(), "length");
    if (!start.ok()) return start.status();
    if (!len.ok()) return len.status();
    uint32_t flags = (GetBool(v.struct_value(), "data") ? 0 : kStateHole) |
                     (GetBool(v.struct_value(), "zero") ? kStateZero : 0);
    out.push_back({*start, *len, flags});
  }
  absl::Status s = CheckContiguous(out);
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
  Struct root;
  auto s = google::protobuf::util::JsonStringToMessage(json, &root);
  if (!s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad nbdinfo JSON: ", s.ToString()));
  }
  auto it = root.fields().find("exports");
  if (it == root.fields().end() ||
      it->second.kind_case() != Value::kListValue ||
      it->second.list_value().values_size() == 0 ||
      it->second.list_value().values(0).kind_case() != Value::kStructValue) {
    return absl::InvalidArgumentError("nbdinfo JSON has no exports");
  }
  const Struct& ex = it->second.list_value().values(0).struct_value();
  NbdinfoExport out;
  absl::StatusOr<uint64_t> size = GetU64(ex, "export-size");
  if (!size.ok()) return size.status();
  out.size = *size;
  out.read_only = GetBool(ex, "is_read_only");
  out.can_multi_conn = GetBool(ex, "can_multi_conn");
  auto c = ex.fields().find("contexts");
  if (c != ex.fields().end() && c->second.kind_case() == Value::kListValue) {
    for (const Value& v : c->second.list_value().values()) {
      out.contexts.push_back(v.string_value());
    }
  }
  std::sort(out.contexts.begin(), out.contexts.end());
  if (auto v = GetU64(ex, "block_size_minimum"); v.ok())
    out.minimum_block_size = *v;
  if (auto v = GetU64(ex, "block_size_preferred"); v.ok())
    out.preferred_block_size = *v;
  if (auto v = GetU64(ex, "block_size_maximum"); v.ok())
    out.maximum_block_size = *v;
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
