// server/upstream/export_registry.h — the exports blockmeta serves and their
// upstreams, by name; exports are added, updated and removed at run time
// (the config file at start-up and on SIGHUP, the Admin API).
//
// Entries are reference-counted and immutable: a lookup returns a
// std::shared_ptr<const ExportEntry>, so a call that found an export keeps
// using it safely while the export is removed. An entry owns its upstream
// (shared by the versions of one generation); whatever outlives a call
// (cache fetchers, read-ahead, shim exports) holds a std::weak_ptr to the
// upstream, locked per use, never a raw pointer. UpdateExport replaces the
// entry with a new one that shares the upstream and the generation
// (description, TTL and read_only change without reconnecting).
//
// Removal is immediate: Remove marks the generation removed and closes its
// upstream (Upstream::Close, NOT_FOUND "export ... was removed"), so every
// command in flight and every caller waiting for one fails at once, late
// answers are dropped, and nothing waits for the server; streams and shim
// sessions of the export end at once. The upstream object is destroyed
// with its last reference.
//
// Generations: every Add gets a registry-wide unique generation. A removed
// export is "draining" until the last reference to its upstream is gone;
// then the upstream is destroyed (closing its connections and stopping and
// reaping a spawned server) on the registry's reaper thread, the drained
// hook runs (the server frees the export's cache keys and counters there),
// and only after that can the name be added again: Add of a draining name is
// UNAVAILABLE (WaitDrained() waits for it). So a re-added name can never see
// the old generation's cache or counters: no call of the old generation is
// left to fill them.
//
// Hooks run on the thread that changed the registry (added, updated,
// removed: serialized by one mutation lock, outside the lookup lock) or on
// the reaper thread (drained). Lookups (Find, All) take a reader lock and
// copy shared_ptrs: O(log n) / O(n), never blocked by upstream I/O or
// hooks.
//
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_
#define BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/common/mutex.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

enum class ExportOrigin { kFile = 1, kApi = 2 };

// State shared by every version (UpdateExport) of one generation.
struct ExportShared {
  std::atomic<bool> removed{false};
  // Upstream block-status calls made for the gRPC services.
  std::atomic<uint64_t> upstream_calls{0};
  std::atomic<uint64_t> upstream_errors{0};
};

struct ExportEntry {
  blockmeta::v1::ExportConfig config;
  ExportOrigin origin = ExportOrigin::kFile;
  uint64_t generation = 0;
  // Shared with later versions of the same generation. Non-const pointee:
  // Upstream methods are thread-safe.
  std::shared_ptr<Upstream> upstream;
  std::shared_ptr<ExportShared> shared = std::make_shared<ExportShared>();

  // True once the export was removed (or replaced by a new generation).
  bool removed() const { return shared->removed.load(); }
};

using ExportRef = std::shared_ptr<const ExportEntry>;

// Limits checked by ValidateExportConfig.
inline constexpr size_t kMaxExportNameBytes = 256;
inline constexpr uint32_t kMaxUpstreamConnections = 16;
inline constexpr uint32_t kMaxUpstreamTimeoutMs = 3600 * 1000;

// Checks one export: non-empty printable-ASCII name of at most 256 bytes,
// exactly one upstream (an nbd/nbds URI; an existing image path with format
// "", "raw" or "qcow2", bitmaps only for qcow2; a non-empty command argv),
// connections <= 16, upstream_timeout_ms <= 1 h. INVALID_ARGUMENT naming the
// export and the field. Cost: one stat(2) for image upstreams.
absl::Status ValidateExportConfig(const blockmeta::v1::ExportConfig& config);

// ValidateExportConfig for each export, plus unique names.
absl::Status ValidateExports(const blockmeta::v1::ServerConfig& config);

// True when a and b differ at most in description, cache_ttl_seconds and
// read_only (what UpdateExport may change).
bool OnlyMutableFieldsDiffer(const blockmeta::v1::ExportConfig& a,
                             const blockmeta::v1::ExportConfig& b);

class ExportRegistry {
 public:
  // Makes an upstream for a validated config (tests inject fakes).
  using UpstreamFactory =
      std::function<absl::StatusOr<std::unique_ptr<Upstream>>(
          const blockmeta::v1::ExportConfig&)>;

  struct Hooks {
    // After an export was added (or replaced an old generation).
    std::function<void(const ExportRef&)> added;
    // After UpdateExport put a new version in place.
    std::function<void(const ExportRef& now)> updated;
    // After an export left the map (new lookups fail); the entry may still
    // be referenced. Closes sessions that must not outlive the export.
    std::function<void(const ExportRef&)> removed;
    // On the reaper thread once the last reference of a removed generation
    // is gone and its upstream destroyed.
    std::function<void(const std::string& name, uint64_t generation)> drained;
  };

  // An empty registry making upstreams with `factory` (default:
  // CreateUpstream, which starts connecting in the background).
  explicit ExportRegistry(UpstreamFactory factory = nullptr);
  // Removes every export and waits (bounded, 30 s) for them to drain.
  ~ExportRegistry();
  ExportRegistry(const ExportRegistry&) = delete;
  ExportRegistry& operator=(const ExportRegistry&) = delete;

  // A registry with every export of `config` (origin kFile) after
  // ValidateExports (INVALID_ARGUMENT with the export's name and the field at
  // fault); it does not wait for connections.
  static absl::StatusOr<std::unique_ptr<ExportRegistry>> Create(
      const blockmeta::v1::ServerConfig& config);
  // For tests: wrap ready-made upstreams (e.g. fakes).
  static std::unique_ptr<ExportRegistry> FromUpstreams(
      std::vector<
          std::pair<blockmeta::v1::ExportConfig, std::unique_ptr<Upstream>>>
          exports);

  // Set once, before the registry is shared.
  void SetHooks(Hooks hooks);

  // nullptr when unknown.
  ExportRef Find(const std::string& name) const;
  // Sorted by name.
  std::vector<ExportRef> All() const;
  size_t size() const;

  struct AddResult {
    ExportRef entry;
    bool created = false;  // false: it existed with the same config
  };
  // Validates and adds. Same name with an equal config: OK, created=false
  // (an API add of a file export keeps origin kFile). Same name, other
  // config: ALREADY_EXISTS. A name still draining: UNAVAILABLE. Does not
  // wait for the upstream to connect.
  absl::StatusOr<AddResult> Add(const blockmeta::v1::ExportConfig& config,
                                ExportOrigin origin);
  // Replaces description / cache_ttl_seconds / read_only. NOT_FOUND,
  // INVALID_ARGUMENT when anything else differs.
  absl::StatusOr<ExportRef> Update(const blockmeta::v1::ExportConfig& config);
  // Takes the export out of the map, marks it removed and closes its
  // upstream (see above; never waits for it); returns it (the caller may
  // WaitDrained). NOT_FOUND when unknown.
  absl::StatusOr<ExportRef> Remove(const std::string& name);
  // Waits until no generation of `name` is draining; false at the deadline.
  bool WaitDrained(const std::string& name, absl::Time deadline) const;
  bool Draining(const std::string& name) const;

  // Removes every export and waits (until `deadline`) for them to drain.
  void RemoveAll(absl::Time deadline);

  // What a reload changed.
  struct ReloadResult {
    std::vector<std::string> added, removed, updated, replaced;
    size_t unchanged = 0;
  };
  // Makes the file-origin exports equal to config.exports(): adds new names,
  // removes file exports the file no longer names, updates in place when
  // only mutable fields changed, replaces (remove, drain, add) otherwise.
  // API exports are kept unless the file names them (then the file's config
  // wins and the origin becomes kFile). Validates everything first
  // (INVALID_ARGUMENT: nothing changed). A replacement whose old generation
  // does not drain by `drain_deadline` is reported as UNAVAILABLE after the
  // rest was applied.
  absl::StatusOr<ReloadResult> ApplyFile(
      const blockmeta::v1::ServerConfig& config, absl::Time drain_deadline);

 private:
  class Reaper;
  absl::StatusOr<AddResult> AddLocked(const blockmeta::v1::ExportConfig& config,
                                      ExportOrigin origin)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  absl::StatusOr<ExportRef> RemoveLocked(const std::string& name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  void OnDrained(const std::string& name, uint64_t generation);

  // Constant after construction (hooks_: after SetHooks, before sharing).
  UpstreamFactory factory_;
  Hooks hooks_;
  std::shared_ptr<Reaper> reaper_;

  // Serializes mutations (Add/Update/Remove/ApplyFile) and their hooks.
  // Never taken by lookups. Order: admin_mu_ before mu_.
  sync::Mutex admin_mu_;

  mutable sync::Mutex mu_;
  mutable absl::CondVar drained_cv_;  // signalled when draining_ shrinks
  absl::btree_map<std::string, ExportRef> exports_ ABSL_GUARDED_BY(mu_);
  // Removed generations whose upstream is still referenced, per name.
  absl::flat_hash_map<std::string, int> draining_ ABSL_GUARDED_BY(mu_);
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_
