// server/upstream/export_registry.cc — see export_registry.h.
#include "server/upstream/export_registry.h"

#include <sys/stat.h>

#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/quote.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/upstream/nbd_upstream.h"

namespace blockmeta {
namespace {

absl::Status Bad(const blockmeta::v1::ExportConfig& config,
                 absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(
      "export ", QuoteBounded(config.name()), ": ", field, ": ", why));
}

}  // namespace

absl::Status ValidateExportConfig(const blockmeta::v1::ExportConfig& config) {
  const std::string& name = config.name();
  if (name.empty()) return Bad(config, "name", "required");
  if (name.size() > kMaxExportNameBytes) {
    return Bad(config, "name",
               absl::StrCat("longer than ", kMaxExportNameBytes, " bytes"));
  }
  for (char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return Bad(config, "name", "must be printable ASCII");
    }
  }
  switch (config.upstream_case()) {
    case blockmeta::v1::ExportConfig::kNbdUri: {
      const std::string& uri = config.nbd_uri();
      if (!absl::StartsWith(uri, "nbd://") &&
          !absl::StartsWith(uri, "nbds://") &&
          !absl::StartsWith(uri, "nbd+unix://") &&
          !absl::StartsWith(uri, "nbds+unix://") &&
          !absl::StartsWith(uri, "nbd+vsock://") &&
          !absl::StartsWith(uri, "nbds+vsock://")) {
        return Bad(config, "nbd_uri",
                   "must be an nbd://, nbds://, nbd+unix://, nbds+unix://, "
                   "nbd+vsock:// or nbds+vsock:// URI");
      }
      break;
    }
    case blockmeta::v1::ExportConfig::kImage: {
      const auto& image = config.image();
      if (image.path().empty()) return Bad(config, "image.path", "required");
      struct stat st;
      if (stat(image.path().c_str(), &st) != 0) {
        return Bad(config, "image.path",
                   absl::StrCat("cannot access ", QuoteBounded(image.path())));
      }
      if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        return Bad(config, "image.path",
                   absl::StrCat(QuoteBounded(image.path()),
                                " is not a file or block device"));
      }
      if (!image.format().empty() && image.format() != "raw" &&
          image.format() != "qcow2") {
        return Bad(config, "image.format",
                   absl::StrCat(QuoteBounded(image.format()),
                                " is not \"raw\" or \"qcow2\""));
      }
      if (image.bitmaps_size() > 0 && ImageFormat(image) != "qcow2") {
        return Bad(config, "image.bitmaps",
                   "persistent dirty bitmaps need a qcow2 image");
      }
      for (const std::string& b : image.bitmaps()) {
        if (b.empty() || b.size() > 1023) {
          return Bad(config, "image.bitmaps", "bad bitmap name");
        }
      }
      break;
    }
    case blockmeta::v1::ExportConfig::kCommand:
      if (config.command().argv_size() == 0 ||
          config.command().argv(0).empty()) {
        return Bad(config, "command.argv", "required");
      }
      break;
    default:
      return Bad(config, "upstream",
                 "exactly one of nbd_uri, image, command is required");
  }
  if (config.connections() > kMaxUpstreamConnections) {
    return Bad(config, "connections",
               absl::StrCat("at most ", kMaxUpstreamConnections));
  }
  if (config.upstream_timeout_ms() > kMaxUpstreamTimeoutMs) {
    return Bad(config, "upstream_timeout_ms",
               absl::StrCat("at most ", kMaxUpstreamTimeoutMs));
  }
  if (!config.content_id().empty() && !config.immutable()) {
    return Bad(config, "content_id", "only for immutable exports");
  }
  if (config.content_id().size() > kMaxExportNameBytes) {
    return Bad(config, "content_id",
               absl::StrCat("longer than ", kMaxExportNameBytes, " bytes"));
  }
  for (char c : config.content_id()) {
    if (c < 0x20 || c > 0x7e) {
      return Bad(config, "content_id", "must be printable ASCII");
    }
  }
  if (config.immutable() && config.cache_ttl_seconds() != 0) {
    return Bad(config, "cache_ttl_seconds",
               "must be 0 for an immutable export (its extents never "
               "expire)");
  }
  return absl::OkStatus();
}

absl::Status ValidateExports(const blockmeta::v1::ServerConfig& config) {
  absl::flat_hash_set<std::string> names;
  for (const auto& e : config.exports()) {
    absl::Status s = ValidateExportConfig(e);
    if (!s.ok()) return s;
    if (!names.insert(e.name()).second) {
      return Bad(e, "name", "duplicate export name");
    }
  }
  return absl::OkStatus();
}

bool OnlyMutableFieldsDiffer(const blockmeta::v1::ExportConfig& a,
                             const blockmeta::v1::ExportConfig& b) {
  blockmeta::v1::ExportConfig x = a, y = b;
  for (blockmeta::v1::ExportConfig* c : {&x, &y}) {
    c->clear_description();
    c->clear_cache_ttl_seconds();
    c->clear_read_only();
  }
  return google::protobuf::util::MessageDifferencer::Equals(x, y);
}

// Destroys the upstreams of removed generations off the caller's thread
// (destroying one stops and reaps a spawned server, which may take its
// grace period), then tells the registry.
class ExportRegistry::Reaper {
 public:
  struct Item {
    std::unique_ptr<Upstream> upstream;
    std::string name;
    uint64_t generation = 0;
  };

  explicit Reaper(ExportRegistry* owner) : owner_(owner) {
    thread_ = std::thread([this] { Run(); });
  }

  // Called from the upstream's shared_ptr deleter, on any thread.
  void Push(Item item) {
    {
      sync::MutexLock lock(&mu_);
      if (!stopping_) {
        queue_.push_back(std::move(item));
        cv_.Signal();
        return;
      }
    }
    item.upstream.reset();  // the registry is gone: destroy here
  }

  // Runs what is queued, then joins; later Push()es destroy inline.
  void Stop() {
    {
      sync::MutexLock lock(&mu_);
      stopping_ = true;
      cv_.Signal();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    for (;;) {
      Item item;
      {
        sync::MutexLock lock(&mu_);
        while (queue_.empty() && !stopping_) {
          mu_.WaitWithDeadline(&cv_, absl::InfiniteFuture());
        }
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      item.upstream.reset();
      owner_->OnDrained(item.name, item.generation);
    }
  }

  ExportRegistry* const owner_;
  sync::Mutex mu_;
  absl::CondVar cv_;
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

ExportRegistry::ExportRegistry(UpstreamFactory factory)
    : factory_(factory ? std::move(factory) : UpstreamFactory(CreateUpstream)),
      reaper_(std::make_shared<Reaper>(this)) {}

ExportRegistry::~ExportRegistry() {
  RemoveAll(absl::Now() + absl::Seconds(30));
  reaper_->Stop();
}

void ExportRegistry::RemoveAll(absl::Time deadline) {
  std::vector<std::string> names;
  {
    sync::MutexLock lock(&admin_mu_);
    for (const ExportRef& e : All()) {
      names.push_back(e->config.name());
      (void)RemoveLocked(e->config.name());
    }
  }
  for (const std::string& n : names) WaitDrained(n, deadline);
}

void ExportRegistry::SetHooks(Hooks hooks) { hooks_ = std::move(hooks); }

absl::StatusOr<std::unique_ptr<ExportRegistry>> ExportRegistry::Create(
    const blockmeta::v1::ServerConfig& config) {
  absl::Status s = ValidateExports(config);
  if (!s.ok()) return s;
  auto registry = std::make_unique<ExportRegistry>();
  for (const auto& e : config.exports()) {
    absl::StatusOr<AddResult> r = registry->Add(e, ExportOrigin::kFile);
    if (!r.ok()) return r.status();
  }
  return registry;
}

std::unique_ptr<ExportRegistry> ExportRegistry::FromUpstreams(
    std::vector<
        std::pair<blockmeta::v1::ExportConfig, std::unique_ptr<Upstream>>>
        exports) {
  // The factory hands out the given upstreams by name, once each.
  auto pending = std::make_shared<
      absl::flat_hash_map<std::string, std::unique_ptr<Upstream>>>();
  std::vector<blockmeta::v1::ExportConfig> configs;
  // Elements, not structured bindings: clang-tidy 14 does not see the
  // move through a binding and asks for a const reference.
  for (auto& e : exports) {
    (*pending)[e.first.name()] = std::move(e.second);
    configs.push_back(std::move(e.first));
  }
  auto registry = std::make_unique<ExportRegistry>(
      [pending](const blockmeta::v1::ExportConfig& c)
          -> absl::StatusOr<std::unique_ptr<Upstream>> {
        auto it = pending->find(c.name());
        if (it == pending->end() || it->second == nullptr) {
          return absl::FailedPreconditionError(
              absl::StrCat("no test upstream for \"", c.name(), "\""));
        }
        return std::move(it->second);
      });
  for (const auto& c : configs) {
    sync::MutexLock lock(&registry->admin_mu_);
    // Test configs may be partial (no upstream kind): skip validation.
    absl::StatusOr<std::unique_ptr<Upstream>> up = registry->factory_(c);
    if (!up.ok()) continue;
    auto entry = std::make_shared<ExportEntry>();
    entry->config = c;
    entry->origin = ExportOrigin::kFile;
    std::shared_ptr<Reaper> reaper = registry->reaper_;
    {
      sync::MutexLock l(&registry->mu_);
      entry->generation = registry->next_generation_++;
    }
    const uint64_t gen = entry->generation;
    entry->upstream = std::shared_ptr<Upstream>(
        up->release(), [reaper, name = c.name(), gen](Upstream* u) {
          reaper->Push({std::unique_ptr<Upstream>(u), name, gen});
        });
    sync::MutexLock l(&registry->mu_);
    registry->exports_[c.name()] = std::move(entry);
  }
  return registry;
}

ExportRef ExportRegistry::Find(const std::string& name) const {
  sync::ReaderMutexLock lock(&mu_);
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second;
}

std::vector<ExportRef> ExportRegistry::All() const {
  sync::ReaderMutexLock lock(&mu_);
  std::vector<ExportRef> out;
  out.reserve(exports_.size());
  for (const auto& [name, entry] : exports_) out.push_back(entry);
  return out;
}

size_t ExportRegistry::size() const {
  sync::ReaderMutexLock lock(&mu_);
  return exports_.size();
}

absl::StatusOr<ExportRegistry::AddResult> ExportRegistry::Add(
    const blockmeta::v1::ExportConfig& config, ExportOrigin origin) {
  if (absl::Status s = ValidateExportConfig(config); !s.ok()) return s;
  sync::MutexLock lock(&admin_mu_);
  return AddLocked(config, origin);
}

absl::StatusOr<ExportRegistry::AddResult> ExportRegistry::AddLocked(
    const blockmeta::v1::ExportConfig& config, ExportOrigin origin) {
  admin_mu_.AssertHeld();
  const std::string& name = config.name();
  uint64_t generation = 0;
  {
    sync::MutexLock lock(&mu_);
    auto it = exports_.find(name);
    if (it != exports_.end()) {
      if (google::protobuf::util::MessageDifferencer::Equals(it->second->config,
                                                             config)) {
        return AddResult{it->second, false};
      }
      return absl::AlreadyExistsError(absl::StrCat(
          "export ", QuoteBounded(name),
          " already exists with another config; remove it first (or use "
          "UpdateExport for description, cache_ttl_seconds, read_only)"));
    }
    if (draining_.contains(name)) {
      return absl::UnavailableError(
          absl::StrCat("export ", QuoteBounded(name),
                       " is still being removed (calls of its previous "
                       "generation are finishing); retry shortly"));
    }
    generation = next_generation_++;
  }
  absl::StatusOr<std::unique_ptr<Upstream>> up = factory_(config);
  if (!up.ok()) return up.status();
  auto entry = std::make_shared<ExportEntry>();
  entry->config = config;
  entry->origin = origin;
  entry->generation = generation;
  std::shared_ptr<Reaper> reaper = reaper_;
  entry->upstream = std::shared_ptr<Upstream>(
      up->release(), [reaper, name, generation](Upstream* u) {
        reaper->Push({std::unique_ptr<Upstream>(u), name, generation});
      });
  ExportRef ref = entry;
  {
    sync::MutexLock lock(&mu_);
    exports_[name] = ref;
  }
  if (hooks_.added) hooks_.added(ref);
  return AddResult{ref, true};
}

absl::StatusOr<ExportRef> ExportRegistry::Update(
    const blockmeta::v1::ExportConfig& config) {
  if (absl::Status s = ValidateExportConfig(config); !s.ok()) return s;
  sync::MutexLock lock(&admin_mu_);
  ExportRef now;
  {
    sync::MutexLock l(&mu_);
    auto it = exports_.find(config.name());
    if (it == exports_.end()) {
      return absl::NotFoundError(
          absl::StrCat("no export named ", QuoteBounded(config.name())));
    }
    if (!OnlyMutableFieldsDiffer(it->second->config, config)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "export ", QuoteBounded(config.name()),
          ": only description, cache_ttl_seconds and read_only can change "
          "without reconnecting; remove the export and add it again"));
    }
    auto entry = std::make_shared<ExportEntry>(*it->second);
    entry->config = config;
    now = entry;
    it->second = now;
  }
  if (hooks_.updated) hooks_.updated(now);
  return now;
}

absl::StatusOr<ExportRef> ExportRegistry::Remove(const std::string& name) {
  sync::MutexLock lock(&admin_mu_);
  return RemoveLocked(name);
}

absl::StatusOr<ExportRef> ExportRegistry::RemoveLocked(
    const std::string& name) {
  admin_mu_.AssertHeld();
  ExportRef gone;
  {
    sync::MutexLock lock(&mu_);
    auto it = exports_.find(name);
    if (it == exports_.end()) {
      return absl::NotFoundError(
          absl::StrCat("no export named ", QuoteBounded(name)));
    }
    gone = std::move(it->second);
    exports_.erase(it);
    ++draining_[name];  // until the reaper destroyed its upstream
  }
  gone->shared->removed.store(true);
  // Dead at once: what waits on the upstream returns now with this reason
  // (streams and sessions end), its late answers are dropped, and nothing
  // here waits for the server. The object itself goes with its last
  // reference, on the reaper (stopping a spawned server takes time).
  gone->upstream->Close(
      absl::NotFoundError(absl::StrCat("export \"", name, "\" was removed")));
  if (hooks_.removed) hooks_.removed(gone);
  return gone;
}

void ExportRegistry::OnDrained(const std::string& name, uint64_t generation) {
  if (hooks_.drained) hooks_.drained(name, generation);
  sync::MutexLock lock(&mu_);
  auto it = draining_.find(name);
  if (it == draining_.end()) return;  // never added (a failed Add)
  if (--it->second <= 0) draining_.erase(it);
  drained_cv_.SignalAll();
}

bool ExportRegistry::Draining(const std::string& name) const {
  sync::MutexLock lock(&mu_);
  return draining_.contains(name);
}

bool ExportRegistry::WaitDrained(const std::string& name,
                                 absl::Time deadline) const {
  sync::MutexLock lock(&mu_);
  while (draining_.contains(name)) {
    if (mu_.WaitWithDeadline(&drained_cv_, deadline)) {
      return !draining_.contains(name);
    }
  }
  return true;
}

absl::StatusOr<ExportRegistry::ReloadResult> ExportRegistry::ApplyFile(
    const blockmeta::v1::ServerConfig& config, absl::Time drain_deadline) {
  if (absl::Status s = ValidateExports(config); !s.ok()) return s;
  ReloadResult result;
  std::vector<blockmeta::v1::ExportConfig> to_replace;
  {
    sync::MutexLock lock(&admin_mu_);
    absl::flat_hash_set<std::string> named;
    for (const auto& want : config.exports()) {
      named.insert(want.name());
      ExportRef have = Find(want.name());
      if (have == nullptr) {
        absl::StatusOr<AddResult> r = AddLocked(want, ExportOrigin::kFile);
        if (!r.ok()) {
          if (r.status().code() != absl::StatusCode::kUnavailable) {
            return r.status();
          }
          to_replace.push_back(want);  // still draining: add after the wait
          continue;
        }
        result.added.push_back(want.name());
        continue;
      }
      const bool equal = google::protobuf::util::MessageDifferencer::Equals(
          have->config, want);
      if (equal && have->origin == ExportOrigin::kFile) {
        ++result.unchanged;
        continue;
      }
      if (OnlyMutableFieldsDiffer(have->config, want)) {
        // Also turns an API export the file now names into a file export.
        auto entry = std::make_shared<ExportEntry>(*have);
        entry->config = want;
        entry->origin = ExportOrigin::kFile;
        ExportRef now = entry;
        {
          sync::MutexLock l(&mu_);
          exports_[want.name()] = now;
        }
        if (hooks_.updated) hooks_.updated(now);
        if (equal) {
          ++result.unchanged;
        } else {
          result.updated.push_back(want.name());
        }
        continue;
      }
      (void)RemoveLocked(want.name());
      to_replace.push_back(want);
    }
    for (const ExportRef& e : All()) {
      if (e->origin == ExportOrigin::kFile &&
          !named.contains(e->config.name())) {
        (void)RemoveLocked(e->config.name());
        result.removed.push_back(e->config.name());
      }
    }
  }
  // Replacements: the old generation must drain before the name is reused.
  absl::Status late;
  for (const auto& want : to_replace) {
    if (!WaitDrained(want.name(), drain_deadline)) {
      late = absl::UnavailableError(
          absl::StrCat("export ", QuoteBounded(want.name()),
                       " was removed but calls of its previous generation "
                       "did not finish in time; it was not added again"));
      continue;
    }
    absl::StatusOr<AddResult> r = Add(want, ExportOrigin::kFile);
    if (!r.ok()) {
      late = r.status();
      continue;
    }
    result.replaced.push_back(want.name());
  }
  if (!late.ok()) return late;
  return result;
}

}  // namespace blockmeta
