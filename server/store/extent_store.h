// server/store/extent_store.h — the persistent second tier: upstream
// block-status answers of immutable exports, kept in one LevelDB directory
// across restarts and memory evictions.
//
// Layout (all LevelDB keys; values are protobuf or plain strings):
//   "E" be32(slot) be64(start) -> ExtentRecord: contiguous extents from
//                                 `start` (a piece of one upstream answer)
//   "C" identity \0 context    -> be32(slot): the slot of one (identity,
//                                 metadata context)
//   "I" identity               -> last-opened time (decimal ns), for LRU
//   "N" export name            -> the identity the name last served
// A slot numbers one (content identity, context); slots are never reused
// within a process and start above every slot on disk at open.
//
// Invariants:
//   - Every record holds extents one upstream answer gave, written in one
//     atomic WriteBatch after that answer arrived (Write). LevelDB's log
//     checksums make a torn batch invisible after a crash: a record is
//     there whole or not at all.
//   - A record is served only while its slot is live (named by a "C" key
//     loaded at open or created since). Discarding an identity deletes its
//     "C"/"I" keys first, in one batch, and its records after: a crash in
//     between leaves only unreachable records, deleted at the next open.
//   - The bytes of live records (key + value, before LevelDB's compression)
//     stay at most max_bytes: a write that would pass it first evicts whole
//     identities, least recently opened first, never the writer's own; a
//     write that still does not fit is skipped (counted).
//   - A store that cannot be opened or read (corruption, I/O error) is set
//     aside: renamed to PATH.corrupt-<unix ns> and a fresh one is made
//     in its place; if even that fails the store is off (Lookup misses,
//     Write skips) and blockmetad serves from the upstream.
//
// Cost: Lookup is one LevelDB seek plus one step per further contiguous
// record (LevelDB's block cache and the OS page cache keep hot blocks in
// memory); Write is one LevelDB batch (written to the OS, not fsynced: a
// machine crash may lose the newest answers, never corrupt older ones).
// Open scans every record key once to learn the bytes per slot.
//
// Thread-safety: all methods are thread-safe. mu_ guards only the in-memory
// tables; it is never held across LevelDB I/O. The DB handle is a
// shared_ptr swapped under mu_ when the store is set aside, so a call in
// flight keeps using the handle it took.
#ifndef BLOCKMETA_SERVER_STORE_EXTENT_STORE_H_
#define BLOCKMETA_SERVER_STORE_EXTENT_STORE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/cache/extent.h"
#include "server/common/mutex.h"

namespace leveldb {
class DB;
class Cache;
}  // namespace leveldb

namespace blockmeta {

struct ExtentStoreOptions {
  std::string path;  // the LevelDB directory
  uint64_t max_bytes = uint64_t{1} << 30;
  // An answer is stored as records of at most this many extents (values
  // stay small; a lookup reads only the records it needs).
  size_t max_extents_per_record = 4096;
  // LevelDB block cache (decoded blocks kept in memory).
  size_t block_cache_bytes = 8u << 20;
};

struct ExtentStoreStats {
  uint64_t bytes = 0;    // live records, key + value
  uint64_t records = 0;  // live records
  uint64_t extents = 0;  // extents in live records
  uint64_t lookups_hit = 0;
  uint64_t lookups_missed = 0;
  uint64_t writes = 0;          // answers written
  uint64_t writes_skipped = 0;  // did not fit under max_bytes, or failed
  uint64_t evicted_identities = 0;
  uint64_t discarded_identities = 0;  // identity changes, failed checks
  uint64_t set_aside = 0;             // corrupt stores renamed
  bool broken = false;                // off: could not open even a fresh store
};

class ExtentStore {
 public:
  // Opens (or creates) the store at options.path. A store that LevelDB
  // cannot open is set aside and a fresh one made; only when that fails too
  // is the result an error (the caller then runs without a store).
  static absl::StatusOr<std::shared_ptr<ExtentStore>> Open(
      ExtentStoreOptions options);
  ~ExtentStore();
  ExtentStore(const ExtentStore&) = delete;
  ExtentStore& operator=(const ExtentStore&) = delete;

  const ExtentStoreOptions& options() const { return options_; }

  // Export `name` now serves `identity`: when the name last served another
  // identity that no other open export uses, that identity's answers are
  // discarded. Marks the identity open (not evicted while open, if another
  // can go instead) and most recently used. Pair with CloseIdentity.
  void OpenIdentity(const std::string& name, const std::string& identity);
  void CloseIdentity(const std::string& identity);

  // The slot of (identity, context), created (and persisted) if new.
  absl::StatusOr<uint32_t> Slot(const std::string& identity,
                                const std::string& context);
  // The contexts the identity has slots for.
  std::vector<std::string> Contexts(const std::string& identity) const;
  // Live records in the slot.
  uint64_t SlotRecords(uint32_t slot) const;
  // Bytes of the identity's live records.
  uint64_t IdentityBytes(const std::string& identity) const;

  // The stored extents from `offset`: the record containing `offset` (its
  // first extent clipped to start there) and the contiguous records after
  // it, until `length` bytes past offset are covered or max_extents
  // extents were collected. nullopt when no live record contains offset.
  std::optional<ExtentList> Lookup(uint32_t slot, uint64_t offset,
                                   uint64_t length, size_t max_extents);

  // Up to `n` stored windows [start, end) of the slot, spread over it (the
  // first record always among them), to check against the upstream.
  std::vector<std::pair<uint64_t, uint64_t>> SampleWindows(uint32_t slot,
                                                           size_t n);

  // Stores one upstream answer: extents contiguous, lengths nonzero.
  // INVALID_ARGUMENT for a malformed answer (nothing stored);
  // RESOURCE_EXHAUSTED when it does not fit under max_bytes; the LevelDB
  // error otherwise (a corrupt store is set aside). A dead slot (its
  // identity was discarded) stores nothing and returns OK.
  absl::Status Write(uint32_t slot, const ExtentList& extents);

  // Forgets every answer of `identity` (a failed check, a changed
  // identity). Slots given out before stay dead; Slot() makes new ones.
  void DiscardIdentity(const std::string& identity);

  ExtentStoreStats Stats() const;

 private:
  struct SlotState {
    std::string identity;
    uint64_t bytes = 0;
    uint64_t records = 0;
    uint64_t extents = 0;
  };
  struct IdentityState {
    absl::flat_hash_map<std::string, uint32_t> slots;  // by context
    int64_t last_used_ns = 0;
    int open = 0;  // OpenIdentity minus CloseIdentity
  };

  explicit ExtentStore(ExtentStoreOptions options);
  // Opens options_.path (setting it aside once if LevelDB refuses it) and
  // loads the tables.
  absl::Status OpenDb();
  absl::Status LoadTables(leveldb::DB* db);
  std::shared_ptr<leveldb::DB> Db() const;
  // A LevelDB error that means the store is unusable: set it aside and
  // start empty. Runs at most once per handle.
  void OnDbError(const std::shared_ptr<leveldb::DB>& db, absl::string_view op,
                 const std::string& error);
  // Removes the identity from the tables; returns its slots (to delete).
  std::vector<uint32_t> ForgetIdentityLocked(const std::string& identity)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets the identity: its "C"/"I" keys in one batch, then its records.
  void Drop(const std::string& identity);
  // Chooses identities to evict so `need` more bytes fit; false when even
  // evicting every other identity is not enough (nothing chosen then).
  bool ChooseVictimsLocked(const std::string& writer, uint64_t need,
                           std::vector<std::string>* victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Evict(const std::vector<std::string>& victims);

  // Constant after construction.
  const ExtentStoreOptions options_;
  std::shared_ptr<leveldb::Cache> block_cache_;

  mutable sync::Mutex mu_;
  std::shared_ptr<leveldb::DB> db_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint32_t, SlotState> slots_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, IdentityState> identities_
      ABSL_GUARDED_BY(mu_);
  uint32_t next_slot_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;

  std::atomic<uint64_t> lookups_hit_{0}, lookups_missed_{0}, writes_{0},
      writes_skipped_{0}, evicted_identities_{0}, discarded_identities_{0},
      set_aside_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_STORE_EXTENT_STORE_H_
