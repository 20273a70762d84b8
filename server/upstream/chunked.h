// server/upstream/chunked.h — one request split into pieces the upstream
// accepts, all pieces in flight at once.
//
// NBD servers bound a command's length (the negotiated maximum block size
// for reads and writes; 32 bits for trim, zero and cache without extended
// headers). IssueChunked splits [offset, offset + count) into consecutive
// pieces of at most `max_piece` bytes, issues every piece at once (NBD
// allows any number of commands in flight, answered in any order), and
// calls `done` exactly once after the last piece finished: OK when every
// piece succeeded, else the failure of the lowest-offset failed piece (so
// the answer does not depend on reply order).
//
// Invariants: `issue` is called once per piece, in offset order, before
// IssueChunked returns; each piece's callback must be called exactly once
// (on any thread, possibly before `issue` returns). count == 0 calls `done`
// with OK at once.
//
// Thread-safety: piece callbacks may run concurrently on any threads.
#ifndef BLOCKMETA_SERVER_UPSTREAM_CHUNKED_H_
#define BLOCKMETA_SERVER_UPSTREAM_CHUNKED_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

// `delta` is the piece's offset from the start of the request (for buffer
// arithmetic).
using PieceIssuer = absl::FunctionRef<void(
    uint64_t offset, uint64_t length, uint64_t delta, StatusCallback done)>;

void IssueChunked(uint64_t offset, uint64_t count, uint64_t max_piece,
                  PieceIssuer issue, StatusCallback done);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_CHUNKED_H_
