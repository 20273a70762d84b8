// client/extent_format.h — renders a stream of extents in the blockmeta
// CLI's output formats (see docs/client.md for each format's exact shape):
//
//   human      aligned columns with sizes like "1.5 GiB", and a summary;
//   json       one JSON object: {"export", "context", "offset", "end",
//              "export_size", "extents": [{"offset", "length", "type",
//              "description", "hole", "zero", "dirty"}]}; adjacent extents
//              of equal type merged. With several contexts (MapHeader::
//              contexts) also "contexts": [names] in the header and, per
//              extent, "contexts": [{"type", "description"}]; hole/zero
//              come from base:allocation, dirty from the first bitmap
//              (imageio's dirty extents with "zero");
//   qemu-json  byte-identical to `qemu-img map --output=json` (qemu 7.2)
//              over the same NBD export (base:allocation only);
//   nbdinfo    identical to `nbdinfo --map[=CONTEXT]` (libnbd 1.14);
//   csv        "offset,length,type,description" rows, merged as json.
//
// and, with totals, the bytes per type (like `nbdinfo --map --totals`).
//
// With several contexts, the human format shows one column per context
// (for `changed`: the bitmap's TYPE and a ZERO column), and runs merge only
// when every context's type is equal.
//
// A writer is fed extents in increasing, contiguous order (as
// ExtentIterator yields them) and keeps O(1) state, so mapping a huge disk
// needs no memory beyond the output buffer (totals keep one counter per
// distinct type). Not thread-safe.
#ifndef BLOCKMETA_CLIENT_EXTENT_FORMAT_H_
#define BLOCKMETA_CLIENT_EXTENT_FORMAT_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockmeta/v1/blockmeta.pb.h"

namespace blockmeta::client {

enum class OutputFormat { kHuman, kJson, kQemuJson, kNbdinfo, kCsv };

// "human", "json", "qemu-json", "nbdinfo", "csv"; INVALID_ARGUMENT otherwise.
absl::StatusOr<OutputFormat> ParseOutputFormat(absl::string_view name);

// The NBD status type of an extent in `context`: its nbd_flags, with the
// bits its booleans imply OR-ed in (hole = 1, zero = 2 for base:allocation;
// dirty = 1 for qemu:dirty-bitmap:*).
uint32_t ExtentType(absl::string_view context, const blockmeta::v1::Extent& e);

// nbdinfo's description of a type: "data", "hole", "zero", "hole,zero" for
// base:allocation; "clean", "dirty" for dirty bitmaps; "absent", "local",
// "backing depth N" for qemu:allocation-depth; "" when it has none.
std::string TypeDescription(absl::string_view context, uint32_t type);

struct MapHeader {
  std::string export_name;
  std::string context;  // Never empty ("base:allocation" filled in).
  // Several contexts side by side (a multi-context MapExtents; context is
  // then contexts[0]): each extent carries Extent.contexts in this order.
  // Only the human and json formats show them; empty for one context.
  std::vector<std::string> contexts;
  uint64_t offset = 0;  // Range mapped: [offset, end).
  uint64_t end = 0;
  uint64_t export_size = 0;
};

struct WriterOptions {
  OutputFormat format = OutputFormat::kHuman;
  // Print bytes per type instead of the extents.
  bool totals = false;
  // Human format only: list only dirty (type & 1) extents, as
  // `blockmeta changed` does.
  bool dirty_only = false;
};

class ExtentWriter {
 public:
  virtual ~ExtentWriter() = default;
  // Called once, before the first extent.
  virtual void Begin(const MapHeader& header) = 0;
  virtual void Add(const blockmeta::v1::Extent& extent) = 0;
  // Called once, after the last extent (also with no extents at all).
  virtual void End() = 0;
};

// INVALID_ARGUMENT for combinations that make no sense (qemu-json with
// totals). The writer writes to `out`, which must outlive it. qemu-json
// works on any context's flags but only base:allocation matches qemu-img.
absl::StatusOr<std::unique_ptr<ExtentWriter>> MakeExtentWriter(
    const WriterOptions& options, std::ostream* out);

// JSON string literal for `s` (quotes included), escaping as RFC 8259 asks.
std::string JsonQuote(absl::string_view s);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_EXTENT_FORMAT_H_
