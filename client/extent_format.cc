// client/extent_format.cc — see extent_format.h.
#include "client/extent_format.h"

#include <map>
#include <optional>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/units.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;
using blockmeta::v1::Extent;

constexpr absl::string_view kBaseAllocation = "base:allocation";
constexpr absl::string_view kDirtyPrefix = "qemu:dirty-bitmap:";

bool IsBase(absl::string_view context) {
  return context.empty() || context == kBaseAllocation;
}
bool IsDirtyBitmap(absl::string_view context) {
  return absl::StartsWith(context, kDirtyPrefix);
}

// A run of adjacent extents with equal type (and, with several contexts,
// equal types in every context).
struct Run {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t type = 0;
  std::vector<uint32_t> types;  // per MapHeader::contexts; else empty
};

// The type of one context of a multi-context extent, as ExtentType.
uint32_t ContextType(absl::string_view context, const v1::ContextFlags& f) {
  uint32_t t = f.nbd_flags();
  if (IsBase(context)) {
    if (f.hole()) t |= 1;
    if (f.zero()) t |= 2;
  } else if (IsDirtyBitmap(context) && f.dirty()) {
    t |= 1;
  }
  return t;
}

// Merges adjacent extents of equal type and hands each finished run to
// Emit(). Subclasses print.
class MergingWriter : public ExtentWriter {
 public:
  explicit MergingWriter(std::ostream* out) : out_(*out) {}

  void Begin(const MapHeader& header) override {
    header_ = header;
    Header();
  }
  void Add(const Extent& e) override {
    uint32_t type = ExtentType(header_.context, e);
    std::vector<uint32_t> types;
    for (size_t i = 0; i < header_.contexts.size(); ++i) {
      types.push_back(i < static_cast<size_t>(e.contexts_size())
                          ? ContextType(header_.contexts[i], e.contexts(i))
                          : 0);
    }
    if (!types.empty()) type = types[0];
    if (run_.has_value() && run_->type == type && run_->types == types &&
        run_->offset + run_->length == e.offset()) {
      run_->length += e.length();
      return;
    }
    if (run_.has_value()) Emit(*run_);
    run_ = Run{e.offset(), e.length(), type, std::move(types)};
  }
  void End() override {
    if (run_.has_value()) Emit(*run_);
    run_.reset();
    Footer();
  }

 protected:
  virtual void Header() {}
  virtual void Emit(const Run& run) = 0;
  virtual void Footer() {}

  std::ostream& out_;
  MapHeader header_;

 private:
  std::optional<Run> run_;
};

// --- nbdinfo --map --------------------------------------------------------

class NbdinfoWriter final : public MergingWriter {
 public:
  using MergingWriter::MergingWriter;

 private:
  void Emit(const Run& r) override {
    std::string line =
        absl::StrFormat("%10u  %10u  %3u", r.offset, r.length, r.type);
    std::string d = TypeDescription(header_.context, r.type);
    if (!d.empty()) absl::StrAppend(&line, "  ", d);
    out_ << line << "\n";
  }
};

// --- qemu-img map --output=json -------------------------------------------
// qemu's NBD client turns each NBD extent into block status: DATA unless
// HOLE, ZERO if ZERO, and always OFFSET_VALID with the mapping equal to the
// guest offset. qemu-img map then calls an area with neither DATA nor ZERO
// "unallocated" (present false, no offset), and merges adjacent entries
// whose present/zero/data/offset agree. qemu sizes an NBD disk in 512-byte
// sectors, so an export whose size is not a multiple of 512 gets a final
// entry past the end that reads as zeroes (present, zero, no offset).

struct QemuEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool has_offset = false;
};

class QemuJsonWriter final : public ExtentWriter {
 public:
  explicit QemuJsonWriter(std::ostream* out) : out_(*out) {}

  void Begin(const MapHeader& header) override {
    header_ = header;
    out_ << "[";
  }
  void Add(const Extent& e) override {
    uint32_t type = ExtentType(header_.context, e);
    QemuEntry q;
    q.start = e.offset();
    q.length = e.length();
    q.data = (type & 1) == 0;
    q.zero = (type & 2) != 0;
    q.present = q.data || q.zero;
    q.has_offset = q.present;
    Push(q);
  }
  void End() override {
    uint64_t size = header_.export_size;
    if (header_.end == size && size % 512 != 0) {
      QemuEntry tail;
      tail.start = size;
      tail.length = 512 - size % 512;
      tail.present = true;
      tail.zero = true;
      Push(tail);
    }
    if (!cur_.has_value() && size == 0) {
      // qemu-img maps an empty image as one zero-length, absent entry.
      Print(QemuEntry{}, /*last=*/true);
    }
    if (cur_.has_value()) Print(*cur_, /*last=*/true);
    cur_.reset();
    out_ << "]\n";
  }

 private:
  void Push(const QemuEntry& q) {
    if (cur_.has_value() && cur_->start + cur_->length == q.start &&
        cur_->present == q.present && cur_->zero == q.zero &&
        cur_->data == q.data && cur_->has_offset == q.has_offset) {
      cur_->length += q.length;
      return;
    }
    if (cur_.has_value()) Print(*cur_, /*last=*/false);
    cur_ = q;
  }
  void Print(const QemuEntry& q, bool last) {
    out_ << absl::StrFormat(
        "{ \"start\": %u, \"length\": %u, \"depth\": 0, \"present\": %s, "
        "\"zero\": %s, \"data\": %s",
        q.start, q.length, q.present ? "true" : "false",
        q.zero ? "true" : "false", q.data ? "true" : "false");
    if (q.has_offset) out_ << ", \"offset\": " << q.start;
    out_ << "}";
    if (!last) out_ << ",\n";
  }

  std::ostream& out_;
  MapHeader header_;
  std::optional<QemuEntry> cur_;
};

// --- json ------------------------------------------------------------------

std::string JsonHeaderFields(const MapHeader& h) {
  return absl::StrCat("\"export\": ", JsonQuote(h.export_name),
                      ", \"context\": ", JsonQuote(h.context),
                      ", \"offset\": ", h.offset, ", \"end\": ", h.end,
                      ", \"export_size\": ", h.export_size);
}

void TypeFlags(absl::string_view context, uint32_t type, bool* hole, bool* zero,
               bool* dirty) {
  *hole = *zero = *dirty = false;
  if (IsBase(context)) {
    *hole = (type & 1) != 0;
    *zero = (type & 2) != 0;
  } else if (IsDirtyBitmap(context)) {
    *dirty = (type & 1) != 0;
  }
}

class JsonWriter final : public MergingWriter {
 public:
  using MergingWriter::MergingWriter;

 private:
  void Header() override {
    out_ << "{" << JsonHeaderFields(header_);
    if (!header_.contexts.empty()) {
      std::vector<std::string> names;
      for (const std::string& c : header_.contexts)
        names.push_back(JsonQuote(c));
      out_ << ", \"contexts\": [" << absl::StrJoin(names, ", ") << "]";
    }
    out_ << ", \"extents\": [";
  }
  void Emit(const Run& r) override {
    bool hole, zero, dirty;
    TypeFlags(header_.context, r.type, &hole, &zero, &dirty);
    std::string per_context;
    if (!r.types.empty()) {
      // hole/zero from base:allocation, dirty from the first bitmap.
      bool dirty_seen = false;
      hole = zero = dirty = false;
      std::vector<std::string> items;
      for (size_t i = 0; i < r.types.size(); ++i) {
        const std::string& c = header_.contexts[i];
        bool h, z, d;
        TypeFlags(c, r.types[i], &h, &z, &d);
        if (IsBase(c)) {
          hole = h;
          zero = z;
        } else if (IsDirtyBitmap(c) && !dirty_seen) {
          dirty = d;
          dirty_seen = true;
        }
        items.push_back(
            absl::StrFormat("{\"type\": %u, \"description\": %s}", r.types[i],
                            JsonQuote(TypeDescription(c, r.types[i]))));
      }
      per_context =
          absl::StrCat(", \"contexts\": [", absl::StrJoin(items, ", "), "]");
    }
    out_ << (first_ ? "\n" : ",\n")
         << absl::StrFormat(
                "{\"offset\": %u, \"length\": %u, \"type\": %u, "
                "\"description\": %s, \"hole\": %s, \"zero\": %s, "
                "\"dirty\": %s%s}",
                r.offset, r.length, r.type,
                JsonQuote(TypeDescription(header_.context, r.type)),
                hole ? "true" : "false", zero ? "true" : "false",
                dirty ? "true" : "false", per_context);
    first_ = false;
  }
  void Footer() override { out_ << (first_ ? "]}\n" : "\n]}\n"); }

  bool first_ = true;
};

// --- csv -------------------------------------------------------------------

std::string CsvField(absl::string_view s) {
  if (s.find_first_of(",\"\n") == absl::string_view::npos) {
    return std::string(s);
  }
  std::string q = "\"";
  for (char c : s) {
    if (c == '"') q += '"';
    q += c;
  }
  q += '"';
  return q;
}

class CsvWriter final : public MergingWriter {
 public:
  using MergingWriter::MergingWriter;

 private:
  void Header() override { out_ << "offset,length,type,description\n"; }
  void Emit(const Run& r) override {
    out_ << r.offset << "," << r.length << "," << r.type << ","
         << CsvField(TypeDescription(header_.context, r.type)) << "\n";
  }
};

// --- human -----------------------------------------------------------------

std::string Percent(uint64_t part, uint64_t whole) {
  if (whole == 0) return "0.0%";
  return absl::StrFormat(
      "%.1f%%", 100.0 * static_cast<double>(part) / static_cast<double>(whole));
}

class HumanWriter final : public MergingWriter {
 public:
  HumanWriter(std::ostream* out, bool dirty_only)
      : MergingWriter(out), dirty_only_(dirty_only) {}

 private:
  // `changed` with zero information: contexts are {bitmap, base}.
  bool ChangedWithZero() const {
    return dirty_only_ && header_.contexts.size() == 2 &&
           IsBase(header_.contexts[1]);
  }
  std::string Describe(absl::string_view context, uint32_t type) const {
    std::string d = TypeDescription(context, type);
    return d.empty() ? absl::StrCat("type ", type) : d;
  }
  void Header() override {
    width_ = std::max<int>(5, absl::StrCat(header_.end).size());
    std::string ctx = header_.context;
    if (!header_.contexts.empty() && !ChangedWithZero()) {
      ctx = absl::StrJoin(header_.contexts, " + ");
    }
    out_ << "export " << header_.export_name << ", context"
         << (header_.contexts.size() > 1 && !ChangedWithZero() ? "s " : " ")
         << ctx << ", range " << header_.offset << "-" << header_.end << " ("
         << FormatSize(header_.end - header_.offset) << ")\n";
    std::string cols = "TYPE";
    if (ChangedWithZero()) {
      cols = absl::StrFormat("%-5s  %s", "TYPE", "ZERO");
    } else if (!header_.contexts.empty()) {
      std::vector<std::string> names;
      for (size_t i = 0; i < header_.contexts.size(); ++i) {
        names.push_back(
            absl::StrFormat("%-*s", ColumnWidth(i), header_.contexts[i]));
      }
      cols = std::string(
          absl::StripTrailingAsciiWhitespace(absl::StrJoin(names, "  ")));
    }
    out_ << absl::StrFormat("%*s  %*s  %10s  %s\n", width_, "START", width_,
                            "END", "LENGTH", cols);
  }
  int ColumnWidth(size_t i) const {
    return std::max<int>(9, header_.contexts[i].size());  // "hole,zero"
  }
  void Emit(const Run& r) override {
    bytes_[r.type] += r.length;
    ++runs_[r.type];
    if (ChangedWithZero() && (r.type & 1) != 0 && (r.types[1] & 2) != 0) {
      dirty_zero_ += r.length;
    }
    if ((r.type & 1) != 0) {
      // Rows split only by the ZERO column are still one changed range.
      if (r.offset != last_dirty_end_ || dirty_ranges_ == 0) ++dirty_ranges_;
      last_dirty_end_ = r.offset + r.length;
    }
    if (dirty_only_ && (r.type & 1) == 0) return;
    std::string d = Describe(header_.context, r.type);
    if (ChangedWithZero()) {
      d = absl::StrFormat("%-5s  %s", d, (r.types[1] & 2) ? "zero" : "data");
    } else if (!r.types.empty()) {
      std::vector<std::string> cells;
      for (size_t i = 0; i < r.types.size(); ++i) {
        cells.push_back(absl::StrFormat(
            "%-*s", ColumnWidth(i), Describe(header_.contexts[i], r.types[i])));
      }
      d = std::string(
          absl::StripTrailingAsciiWhitespace(absl::StrJoin(cells, "  ")));
    }
    out_ << absl::StrFormat("%*u  %*u  %10s  %s\n", width_, r.offset, width_,
                            r.offset + r.length, FormatSize(r.length), d);
  }
  void Footer() override {
    uint64_t total = header_.end - header_.offset;
    if (dirty_only_) {
      uint64_t dirty = 0, ranges = dirty_ranges_;
      for (const auto& [type, bytes] : bytes_) {
        if (type & 1) dirty += bytes;
      }
      out_ << ranges << " dirty range" << (ranges == 1 ? "" : "s") << ", "
           << FormatSize(dirty) << " of " << FormatSize(total) << " ("
           << Percent(dirty, total) << ") changed";
      if (ChangedWithZero()) {
        out_ << ", " << FormatSize(dirty_zero_) << " of it reads as zeroes";
      }
      out_ << "\n";
      return;
    }
    std::vector<std::string> parts;
    for (const auto& [type, bytes] : bytes_) {
      std::string d = TypeDescription(header_.context, type);
      if (d.empty()) d = absl::StrCat("type ", type);
      parts.push_back(absl::StrCat(d, " ", FormatSize(bytes), " (",
                                   Percent(bytes, total), ")"));
    }
    out_ << "total " << FormatSize(total) << ": " << absl::StrJoin(parts, ", ")
         << "\n";
  }

  const bool dirty_only_;
  uint64_t dirty_zero_ = 0;
  uint64_t dirty_ranges_ = 0;
  uint64_t last_dirty_end_ = 0;
  int width_ = 5;
  std::map<uint32_t, uint64_t> bytes_;
  std::map<uint32_t, uint64_t> runs_;
};

// --- totals ----------------------------------------------------------------

class TotalsWriter final : public ExtentWriter {
 public:
  TotalsWriter(std::ostream* out, OutputFormat format)
      : out_(*out), format_(format) {}

  void Begin(const MapHeader& header) override { header_ = header; }
  void Add(const Extent& e) override {
    bytes_[ExtentType(header_.context, e)] += e.length();
  }
  void End() override {
    uint64_t total = header_.end - header_.offset;
    switch (format_) {
      case OutputFormat::kNbdinfo:
        // nbdinfo --map --totals: sorted by type; nothing for an empty disk.
        if (total == 0) return;
        for (const auto& [type, bytes] : bytes_) {
          std::string line = absl::StrFormat(
              "%10u %5.1f%% %3u", bytes,
              100.0 * static_cast<double>(bytes) / static_cast<double>(total),
              type);
          std::string d = TypeDescription(header_.context, type);
          if (!d.empty()) absl::StrAppend(&line, " ", d);
          out_ << line << "\n";
        }
        return;
      case OutputFormat::kJson: {
        out_ << "{" << JsonHeaderFields(header_) << ", \"totals\": [";
        bool first = true;
        for (const auto& [type, bytes] : bytes_) {
          out_ << (first ? "\n" : ",\n")
               << absl::StrFormat(
                      "{\"type\": %u, \"description\": %s, \"bytes\": %u, "
                      "\"percent\": %.1f}",
                      type, JsonQuote(TypeDescription(header_.context, type)),
                      bytes,
                      total == 0 ? 0.0
                                 : 100.0 * static_cast<double>(bytes) /
                                       static_cast<double>(total));
          first = false;
        }
        out_ << (first ? "]}\n" : "\n]}\n");
        return;
      }
      case OutputFormat::kCsv:
        out_ << "type,description,bytes,percent\n";
        for (const auto& [type, bytes] : bytes_) {
          out_ << type << ","
               << CsvField(TypeDescription(header_.context, type)) << ","
               << bytes << ","
               << absl::StrFormat(
                      "%.1f", total == 0 ? 0.0
                                         : 100.0 * static_cast<double>(bytes) /
                                               static_cast<double>(total))
               << "\n";
        }
        return;
      case OutputFormat::kHuman:
      case OutputFormat::kQemuJson:
        out_ << "export " << header_.export_name << ", context "
             << header_.context << ", range " << header_.offset << "-"
             << header_.end << " (" << FormatSize(total) << ")\n";
        out_ << absl::StrFormat("%4s  %-12s  %14s  %10s  %7s\n", "TYPE",
                                "DESCRIPTION", "BYTES", "SIZE", "PERCENT");
        for (const auto& [type, bytes] : bytes_) {
          std::string d = TypeDescription(header_.context, type);
          out_ << absl::StrFormat("%4u  %-12s  %14u  %10s  %7s\n", type,
                                  d.empty() ? "-" : d, bytes, FormatSize(bytes),
                                  Percent(bytes, total));
        }
        return;
    }
  }

 private:
  std::ostream& out_;
  const OutputFormat format_;
  MapHeader header_;
  std::map<uint32_t, uint64_t> bytes_;
};

}  // namespace

absl::StatusOr<OutputFormat> ParseOutputFormat(absl::string_view name) {
  if (name == "human") return OutputFormat::kHuman;
  if (name == "json") return OutputFormat::kJson;
  if (name == "qemu-json") return OutputFormat::kQemuJson;
  if (name == "nbdinfo") return OutputFormat::kNbdinfo;
  if (name == "csv") return OutputFormat::kCsv;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown output format ", QuoteBounded(name),
                   " (expected human, json, qemu-json, nbdinfo or csv)"));
}

uint32_t ExtentType(absl::string_view context, const Extent& e) {
  uint32_t type = e.nbd_flags();
  if (IsBase(context)) {
    if (e.hole()) type |= 1;
    if (e.zero()) type |= 2;
  } else if (IsDirtyBitmap(context)) {
    if (e.dirty()) type |= 1;
  }
  return type;
}

std::string TypeDescription(absl::string_view context, uint32_t type) {
  if (IsBase(context)) {
    switch (type) {
      case 0:
        return "data";
      case 1:
        return "hole";
      case 2:
        return "zero";
      case 3:
        return "hole,zero";
    }
  } else if (IsDirtyBitmap(context)) {
    switch (type) {
      case 0:
        return "clean";
      case 1:
        return "dirty";
    }
  } else if (context == "qemu:allocation-depth") {
    switch (type) {
      case 0:
        return "absent";
      case 1:
        return "local";
      default:
        return absl::StrCat("backing depth ", type);
    }
  }
  return "";
}

absl::StatusOr<std::unique_ptr<ExtentWriter>> MakeExtentWriter(
    const WriterOptions& options, std::ostream* out) {
  if (options.totals) {
    if (options.format == OutputFormat::kQemuJson) {
      return absl::InvalidArgumentError(
          "--totals cannot be combined with --output=qemu-json (qemu-img map "
          "has no totals)");
    }
    return std::make_unique<TotalsWriter>(out, options.format);
  }
  switch (options.format) {
    case OutputFormat::kHuman:
      return std::make_unique<HumanWriter>(out, options.dirty_only);
    case OutputFormat::kJson:
      return std::make_unique<JsonWriter>(out);
    case OutputFormat::kQemuJson:
      return std::make_unique<QemuJsonWriter>(out);
    case OutputFormat::kNbdinfo:
      return std::make_unique<NbdinfoWriter>(out);
    case OutputFormat::kCsv:
      return std::make_unique<CsvWriter>(out);
  }
  return absl::InvalidArgumentError("unknown output format");
}

std::string JsonQuote(absl::string_view s) {
  std::string q = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        q += "\\\"";
        break;
      case '\\':
        q += "\\\\";
        break;
      case '\n':
        q += "\\n";
        break;
      case '\r':
        q += "\\r";
        break;
      case '\t':
        q += "\\t";
        break;
      case '\b':
        q += "\\b";
        break;
      case '\f':
        q += "\\f";
        break;
      default:
        if (c < 0x20) {
          q += absl::StrFormat("\\u%04x", c);
        } else {
          q += static_cast<char>(c);
        }
    }
  }
  q += '"';
  return q;
}

}  // namespace blockmeta::client
