// server/upstream/nbd_op.h — one NBD command in flight on a libnbd handle
// (internal to server/upstream).
//
// libnbd calls the completion callback (at most once) and then the free
// callback (exactly once: after the reply, after the connection died, when
// the issue itself failed, or in nbd_close). The free callback computes the
// outcome and queues the Op on the current thread's finished list
// (FinishedOps); the thread that made the libnbd call then runs the Op's
// Finish outside every libnbd lock (RunFinished), so a completion may issue
// further commands. An Op owns what its completion needs (the caller's
// callback, the block status words); it is deleted after Finish.
//
// Thread-safety: an Op is touched by one thread at a time (the issuer, then
// libnbd's callbacks, then the finisher).
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_OP_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_OP_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/cache/extent.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace upstream_internal {

class Conn;

struct Op {
  virtual ~Op() = default;
  virtual void Finish(absl::Status outcome) = 0;

  const char* what = "";
  Conn* conn = nullptr;
  absl::Time issued;
  std::list<Op*>::iterator pos;  // in conn->inflight_
  bool completed = false;        // libnbd's completion callback ran
  int error = 0;                 // its *error
  bool probe = false;            // a health probe, not a caller's command
  absl::Status outcome;
};

struct StatusOp : Op {
  StatusCallback done;
  void Finish(absl::Status s) override { std::move(done)(std::move(s)); }
};

// A small read on an idle handle: a server that is shutting down answers
// ESHUTDOWN (Conn::Retire notices), one that hangs exceeds the timeout.
struct ProbeOp : Op {
  std::vector<char> buf;
  void Finish(absl::Status) override {}
};

// Collects the block status chunk of one context, then validates it: one
// chunk at the asked offset, an even number of words, nonzero lengths;
// clipped to the export size. Malformed: INTERNAL.
struct ExtentsOp : Op {
  std::string name;  // export, for messages
  std::string context;
  uint64_t offset = 0;
  uint64_t size = 0;  // export size, to clip
  int chunks = 0;
  std::vector<uint32_t> entries;
  std::string malformed;
  ExtentsCallback done;

  void Finish(absl::Status s) override;
  absl::StatusOr<ExtentList> Parse() const;
  // libnbd's extent callback (user_data: the ExtentsOp).
  static int OnChunk(void* user_data, const char* metacontext,
                     uint64_t chunk_offset, uint32_t* words, size_t nr_words,
                     int* error);
};

// The Ops finished on this thread, waiting for RunFinished.
std::vector<Op*>& FinishedOps();
// Runs (and deletes) every Op finished on this thread; call with no
// libnbd or connection lock held.
void RunFinished();

}  // namespace upstream_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_OP_H_
