// server/cache/fetcher.h — how the cache asks the upstream for block status.
//
// The two fetcher shapes ExtentCache::Get accepts (a synchronous reference
// that dies with the call, and an asynchronous function the cache may keep
// for read-ahead and prefetch). Kept apart from extent_cache.h so the cache's
// internal units (key_state.h, read_ahead.h) can name them.
#ifndef BLOCKMETA_SERVER_CACHE_FETCHER_H_
#define BLOCKMETA_SERVER_CACHE_FETCHER_H_

#include <cstdint>
#include <functional>

#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/cache/extent.h"

namespace blockmeta {

// Asks the upstream for block status, synchronously. Must return extents
// contiguous from `offset` (at least one, nonzero lengths) or an error; may
// cover less or more than `length`. Must give up by `deadline` (returning
// DEADLINE_EXCEEDED). Called without any cache lock held. A Get() with a
// synchronous fetcher neither detaches nor reads ahead (the fetcher is a
// reference that dies with the call).
using Fetcher = absl::FunctionRef<absl::StatusOr<ExtentList>(
    uint64_t offset, uint64_t length, absl::Time deadline)>;

// The completion of one asynchronous fetch (the same type as
// Upstream's ExtentsCallback).
using FetchDone = absl::AnyInvocable<void(absl::StatusOr<ExtentList>) &&>;

// Asks the upstream for block status, asynchronously: issues one request
// for [offset, offset + length) and returns; calls `done` exactly once, on
// any thread, possibly before returning. The answer rules are the
// synchronous Fetcher's. The fetch has no caller deadline: it runs under
// the upstream's own timeout. Called without any cache lock held; `done`
// takes a key lock briefly and may issue further fetches (read-ahead)
// through a copy of the fetcher, so the fetcher must own what it captures
// and stay callable until every fetch it issued has completed.
using AsyncFetcher =
    std::function<void(uint64_t offset, uint64_t length, FetchDone done)>;

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_FETCHER_H_
