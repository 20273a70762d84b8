// server/upstream/nbd_op.cc — see nbd_op.h.
#include "server/upstream/nbd_op.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace blockmeta {
namespace upstream_internal {

void ExtentsOp::Finish(absl::Status s) {
  if (!s.ok()) {
    std::move(done)(std::move(s));
    return;
  }
  std::move(done)(Parse());
}

absl::StatusOr<ExtentList> ExtentsOp::Parse() const {
  auto bad = [&](absl::string_view why) {
    return absl::InternalError(absl::StrCat(
        "export ", name, ": upstream sent a malformed block status reply for ",
        context, " at ", offset, ": ", why));
  };
  if (!malformed.empty()) return bad(malformed);
  if (chunks == 0 || entries.empty()) return bad("no extents for the context");
  ExtentList out;
  out.reserve(entries.size() / 2);
  uint64_t cursor = offset;
  for (size_t i = 0; i + 1 < entries.size(); i += 2) {
    const uint64_t len = entries[i];
    if (len == 0) return bad(absl::StrCat("zero-length extent #", i / 2));
    if (cursor >= size) break;  // past the end: ignore the rest
    const uint64_t clipped = std::min(len, size - cursor);
    out.push_back(Extent{cursor, clipped, entries[i + 1]});
    cursor += clipped;
  }
  return out;
}

int ExtentsOp::OnChunk(void* user_data, const char* metacontext,
                       uint64_t chunk_offset, uint32_t* words, size_t nr_words,
                       int* /*error*/) {
  auto* op = static_cast<ExtentsOp*>(user_data);
  if (op->context != metacontext) return 0;
  if (++op->chunks > 1) {
    op->malformed = "more than one block status chunk for the context";
  } else if (chunk_offset != op->offset) {
    op->malformed =
        absl::StrCat("chunk for offset ", chunk_offset, ", asked ", op->offset);
  } else if (nr_words % 2 != 0) {
    op->malformed = "odd number of extent words";
  } else {
    op->entries.assign(words, words + nr_words);
  }
  return 0;
}

std::vector<Op*>& FinishedOps() {
  thread_local std::vector<Op*> finished;
  return finished;
}

void RunFinished() {
  std::vector<Op*>& q = FinishedOps();
  while (!q.empty()) {
    std::vector<Op*> batch;
    batch.swap(q);
    for (Op* op : batch) {
      op->Finish(std::move(op->outcome));
      delete op;
    }
  }
}

}  // namespace upstream_internal
}  // namespace blockmeta
