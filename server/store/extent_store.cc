// server/store/extent_store.cc — see extent_store.h.
#include "server/store/extent_store.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "leveldb/cache.h"
#include "leveldb/db.h"
#include "leveldb/iterator.h"
#include "leveldb/options.h"
#include "leveldb/write_batch.h"
#include "server/common/log.h"
#include "store_record.pb.h"

namespace blockmeta {
namespace {

constexpr char kRecordTag = 'E';
constexpr char kContextTag = 'C';
constexpr char kIdentityTag = 'I';
constexpr char kNameTag = 'N';
constexpr size_t kRecordKeyBytes = 13;  // tag + be32 slot + be64 start

void PutBe(std::string* s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) {
    s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
}

uint64_t GetBe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::string RecordKey(uint32_t slot, uint64_t start) {
  std::string k(1, kRecordTag);
  PutBe(&k, slot, 4);
  PutBe(&k, start, 8);
  return k;
}

std::string SlotPrefix(uint32_t slot) {
  std::string k(1, kRecordTag);
  PutBe(&k, slot, 4);
  return k;
}

bool ParseRecordKey(const leveldb::Slice& k, uint32_t* slot, uint64_t* start) {
  if (k.size() != kRecordKeyBytes || k[0] != kRecordTag) return false;
  *slot = static_cast<uint32_t>(GetBe(k.data() + 1, 4));
  *start = GetBe(k.data() + 5, 8);
  return true;
}

std::string ContextKey(const std::string& identity,
                       const std::string& context) {
  return absl::StrCat(std::string(1, kContextTag), identity,
                      std::string(1, '\0'), context);
}

std::string IdentityKey(const std::string& identity) {
  return std::string(1, kIdentityTag) + identity;
}

std::string NameKey(const std::string& name) {
  return std::string(1, kNameTag) + name;
}

// A record decoded back into extents from `start`; false if malformed.
bool DecodeRecord(uint64_t start, const leveldb::Slice& value,
                  ExtentList* out) {
  blockmeta::store::ExtentRecord r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size())) ||
      r.lengths_size() != r.flags_size() || r.lengths_size() == 0) {
    return false;
  }
  uint64_t pos = start;
  for (int i = 0; i < r.lengths_size(); ++i) {
    if (r.lengths(i) == 0 || pos + r.lengths(i) < pos) return false;
    out->push_back(Extent{pos, r.lengths(i), r.flags(i)});
    pos += r.lengths(i);
  }
  return true;
}

absl::Status FromLevelDb(const leveldb::Status& s) {
  if (s.ok()) return absl::OkStatus();
  if (s.IsNotFound()) return absl::NotFoundError(s.ToString());
  if (s.IsCorruption()) return absl::DataLossError(s.ToString());
  return absl::UnavailableError(s.ToString());
}

leveldb::ReadOptions Checked() {
  leveldb::ReadOptions r;
  r.verify_checksums = true;
  return r;
}

}  // namespace

ExtentStore::ExtentStore(ExtentStoreOptions options)
    : options_(std::move(options)),
      block_cache_(leveldb::NewLRUCache(options_.block_cache_bytes)) {}

ExtentStore::~ExtentStore() {
  sync::MutexLock lock(&mu_);
  db_.reset();  // closes LevelDB (calls in flight keep their own handle)
}

absl::StatusOr<std::shared_ptr<ExtentStore>> ExtentStore::Open(
    ExtentStoreOptions options) {
  if (options.path.empty()) {
    return absl::InvalidArgumentError("store.path is empty");
  }
  std::shared_ptr<ExtentStore> s(new ExtentStore(std::move(options)));
  if (absl::Status st = s->OpenDb(); !st.ok()) return st;
  return s;
}

absl::Status ExtentStore::OpenDb() {
  leveldb::Options o;
  o.create_if_missing = true;
  o.paranoid_checks = true;  // a corrupt log or table fails the open
  o.block_cache = block_cache_.get();
  o.compression = leveldb::kSnappyCompression;
  absl::Status last;
  for (int attempt = 0; attempt < 2; ++attempt) {
    leveldb::DB* raw = nullptr;
    leveldb::Status s = leveldb::DB::Open(o, options_.path, &raw);
    absl::Status st = FromLevelDb(s);
    std::shared_ptr<leveldb::DB> db(raw);
    if (st.ok()) st = LoadTables(db.get());
    if (st.ok()) {
      sync::MutexLock lock(&mu_);
      db_ = std::move(db);
      broken_ = false;
      return absl::OkStatus();
    }
    db.reset();
    last = st;
    if (attempt == 0) {
      std::string aside = absl::StrCat(options_.path, ".corrupt-",
                                       absl::ToUnixNanos(absl::Now()));
      LogError("store_set_aside", {{"path", options_.path},
                                   {"moved_to", aside},
                                   {"error", st.message()}});
      if (std::rename(options_.path.c_str(), aside.c_str()) != 0) break;
      set_aside_.fetch_add(1);
    }
  }
  sync::MutexLock lock(&mu_);
  broken_ = true;
  return absl::UnavailableError(absl::StrCat(
      "cannot open the store at ", options_.path, ": ", last.message()));
}

absl::Status ExtentStore::LoadTables(leveldb::DB* db) {
  absl::flat_hash_map<uint32_t, SlotState> slots;
  absl::flat_hash_map<std::string, IdentityState> identities;
  uint32_t max_slot = 0;
  leveldb::ReadOptions scan = Checked();
  scan.fill_cache = false;  // one pass over everything: keep the cache hot
  std::unique_ptr<leveldb::Iterator> it(db->NewIterator(scan));
  // Contexts ("C") and identities ("I").
  for (it->Seek(std::string(1, kContextTag));
       it->Valid() && it->key()[0] == kContextTag; it->Next()) {
    std::string k = it->key().ToString();
    size_t nul = k.find('\0', 1);
    if (nul == std::string::npos || it->value().size() != 4) continue;
    uint32_t slot = static_cast<uint32_t>(GetBe(it->value().data(), 4));
    std::string identity = k.substr(1, nul - 1);
    identities[identity].slots[k.substr(nul + 1)] = slot;
    slots[slot].identity = identity;
    max_slot = std::max(max_slot, slot);
  }
  for (it->Seek(std::string(1, kIdentityTag));
       it->Valid() && it->key()[0] == kIdentityTag; it->Next()) {
    std::string identity = it->key().ToString().substr(1);
    int64_t ns = 0;
    if (absl::SimpleAtoi(it->value().ToString(), &ns)) {
      identities[identity].last_used_ns = ns;
    }
  }
  // Records: count live ones, delete orphans (a crash mid-discard).
  leveldb::WriteBatch orphans;
  size_t orphan_count = 0;
  uint64_t bytes = 0;
  for (it->Seek(std::string(1, kRecordTag));
       it->Valid() && it->key()[0] == kRecordTag; it->Next()) {
    uint32_t slot = 0;
    uint64_t start = 0;
    if (!ParseRecordKey(it->key(), &slot, &start)) {
      orphans.Delete(it->key());
      ++orphan_count;
      continue;
    }
    max_slot = std::max(max_slot, slot);
    auto s = slots.find(slot);
    if (s == slots.end()) {
      orphans.Delete(it->key());
      ++orphan_count;
      continue;
    }
    blockmeta::store::ExtentRecord r;
    if (!r.ParseFromArray(it->value().data(),
                          static_cast<int>(it->value().size()))) {
      return absl::DataLossError("undecodable record");
    }
    uint64_t b = it->key().size() + it->value().size();
    s->second.bytes += b;
    s->second.records += 1;
    s->second.extents += r.lengths_size();
    bytes += b;
  }
  if (!it->status().ok()) return FromLevelDb(it->status());
  it.reset();
  if (orphan_count > 0) {
    if (absl::Status st = FromLevelDb(db->Write({}, &orphans)); !st.ok()) {
      return st;
    }
    LogWarning("store_orphans_deleted", {{"records", orphan_count}});
  }
  sync::MutexLock lock(&mu_);
  slots_ = std::move(slots);
  identities_ = std::move(identities);
  bytes_ = bytes;
  next_slot_ = std::max(next_slot_, max_slot + 1);
  return absl::OkStatus();
}

std::shared_ptr<leveldb::DB> ExtentStore::Db() const {
  sync::MutexLock lock(&mu_);
  return db_;
}

void ExtentStore::OnDbError(const std::shared_ptr<leveldb::DB>& db,
                            absl::string_view op, const std::string& error) {
  {
    sync::MutexLock lock(&mu_);
    if (db_ != db) return;  // already set aside by another call
    db_.reset();
    slots_.clear();
    identities_.clear();
    bytes_ = 0;
    broken_ = true;
  }
  LogError("store_error",
           {{"path", options_.path}, {"operation", op}, {"error", error}});
  // Calls in flight may still hold `db`; LevelDB's lock file is released
  // only when the last one drops it. Setting aside renames the directory,
  // which is safe under an open handle on Linux; the fresh store is opened
  // at the next start (the lock file of the old one is still held here).
  std::string aside =
      absl::StrCat(options_.path, ".corrupt-", absl::ToUnixNanos(absl::Now()));
  if (std::rename(options_.path.c_str(), aside.c_str()) == 0) {
    set_aside_.fetch_add(1);
    LogError("store_set_aside",
             {{"path", options_.path}, {"moved_to", aside}, {"error", error}});
  }
}

void ExtentStore::OpenIdentity(const std::string& name,
                               const std::string& identity) {
  std::shared_ptr<leveldb::DB> db = Db();
  if (db == nullptr) return;
  std::string previous;
  leveldb::Status s = db->Get(Checked(), NameKey(name), &previous);
  if (!s.ok() && !s.IsNotFound()) {
    OnDbError(db, "open_identity", s.ToString());
    return;
  }
  const int64_t now = absl::ToUnixNanos(absl::Now());
  bool discard_previous = false;
  {
    sync::MutexLock lock(&mu_);
    IdentityState& st = identities_[identity];
    st.open += 1;
    st.last_used_ns = now;
    if (s.ok() && previous != identity) {
      auto p = identities_.find(previous);
      discard_previous = p != identities_.end() && p->second.open == 0;
    }
  }
  if (discard_previous) {
    LogInfo("store_identity_changed",
            {{"export", name}, {"previous", previous}, {"identity", identity}});
    DiscardIdentity(previous);
  }
  leveldb::WriteBatch b;
  b.Put(NameKey(name), identity);
  b.Put(IdentityKey(identity), absl::StrCat(now));
  if (leveldb::Status w = db->Write({}, &b); !w.ok()) {
    OnDbError(db, "open_identity", w.ToString());
  }
}

void ExtentStore::CloseIdentity(const std::string& identity) {
  sync::MutexLock lock(&mu_);
  auto it = identities_.find(identity);
  if (it != identities_.end() && it->second.open > 0) it->second.open -= 1;
}

absl::StatusOr<uint32_t> ExtentStore::Slot(const std::string& identity,
                                           const std::string& context) {
  std::shared_ptr<leveldb::DB> db;
  uint32_t slot = 0;
  {
    sync::MutexLock lock(&mu_);
    if (db_ == nullptr) return absl::UnavailableError("the store is off");
    db = db_;
    IdentityState& st = identities_[identity];
    auto it = st.slots.find(context);
    if (it != st.slots.end()) return it->second;
    slot = next_slot_++;
    st.slots[context] = slot;
    slots_[slot].identity = identity;
  }
  std::string v;
  PutBe(&v, slot, 4);
  leveldb::WriteBatch b;
  b.Put(ContextKey(identity, context), v);
  if (leveldb::Status s = db->Write({}, &b); !s.ok()) {
    OnDbError(db, "slot", s.ToString());
    return FromLevelDb(s);
  }
  return slot;
}

std::vector<std::string> ExtentStore::Contexts(
    const std::string& identity) const {
  std::vector<std::string> out;
  sync::MutexLock lock(&mu_);
  auto it = identities_.find(identity);
  if (it == identities_.end()) return out;
  for (const auto& [context, slot] : it->second.slots) out.push_back(context);
  return out;
}

uint64_t ExtentStore::SlotRecords(uint32_t slot) const {
  sync::MutexLock lock(&mu_);
  auto it = slots_.find(slot);
  return it == slots_.end() ? 0 : it->second.records;
}

uint64_t ExtentStore::IdentityBytes(const std::string& identity) const {
  sync::MutexLock lock(&mu_);
  auto it = identities_.find(identity);
  if (it == identities_.end()) return 0;
  uint64_t b = 0;
  for (const auto& [context, slot] : it->second.slots) {
    auto s = slots_.find(slot);
    if (s != slots_.end()) b += s->second.bytes;
  }
  return b;
}

std::optional<ExtentList> ExtentStore::Lookup(uint32_t slot, uint64_t offset,
                                              uint64_t length,
                                              size_t max_extents) {
  std::shared_ptr<leveldb::DB> db;
  {
    sync::MutexLock lock(&mu_);
    auto s = slots_.find(slot);
    if (db_ == nullptr || s == slots_.end() || s->second.records == 0) {
      lookups_missed_.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    db = db_;
  }
  const uint64_t want_end =
      length > UINT64_MAX - offset ? UINT64_MAX : offset + length;
  std::unique_ptr<leveldb::Iterator> it(db->NewIterator(Checked()));
  // The record with the greatest start <= offset.
  it->Seek(RecordKey(slot, offset));
  uint32_t s = 0;
  uint64_t start = 0;
  if (!it->Valid() || !ParseRecordKey(it->key(), &s, &start) || s != slot ||
      start != offset) {
    if (it->Valid()) {
      it->Prev();
    } else {
      it->SeekToLast();
    }
  }
  ExtentList out;
  uint64_t cursor = offset;
  bool bad = false;
  while (it->Valid() && ParseRecordKey(it->key(), &s, &start) && s == slot) {
    if (start > cursor) break;  // a gap
    ExtentList rec;
    if (!DecodeRecord(start, it->value(), &rec)) {
      bad = true;
      break;
    }
    if (rec.back().end() <= cursor) {
      if (out.empty()) break;  // no record contains offset
      it->Next();              // overlapped by what we have
      continue;
    }
    for (const Extent& x : rec) {
      if (x.end() <= cursor) continue;
      Extent e = x;
      if (e.offset < cursor) {
        e.length = e.end() - cursor;
        e.offset = cursor;
      }
      out.push_back(e);
      cursor = e.end();
      if (cursor >= want_end || out.size() >= max_extents) break;
    }
    if (cursor >= want_end || out.size() >= max_extents) break;
    it->Next();
  }
  leveldb::Status st = it->status();
  it.reset();
  if (!st.ok() || bad) {
    OnDbError(db, "lookup",
              bad ? std::string("undecodable record") : st.ToString());
    lookups_missed_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  if (out.empty()) {
    lookups_missed_.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  lookups_hit_.fetch_add(1, std::memory_order_relaxed);
  return out;
}

std::vector<std::pair<uint64_t, uint64_t>> ExtentStore::SampleWindows(
    uint32_t slot, size_t n) {
  std::vector<std::pair<uint64_t, uint64_t>> all;
  std::shared_ptr<leveldb::DB> db = Db();
  if (db == nullptr || n == 0) return all;
  std::unique_ptr<leveldb::Iterator> it(db->NewIterator(Checked()));
  uint32_t s = 0;
  uint64_t start = 0;
  for (it->Seek(RecordKey(slot, 0));
       it->Valid() && ParseRecordKey(it->key(), &s, &start) && s == slot;
       it->Next()) {
    ExtentList rec;
    if (!DecodeRecord(start, it->value(), &rec)) break;
    all.emplace_back(start, rec.back().end());
  }
  if (all.size() <= n) return all;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (size_t i = 0; i < n; ++i) out.push_back(all[i * all.size() / n]);
  return out;
}

absl::Status ExtentStore::Write(uint32_t slot, const ExtentList& extents) {
  if (extents.empty()) return absl::InvalidArgumentError("empty answer");
  for (size_t i = 0; i < extents.size(); ++i) {
    if (extents[i].length == 0 ||
        extents[i].offset + extents[i].length < extents[i].offset ||
        (i > 0 && extents[i].offset != extents[i - 1].end())) {
      return absl::InvalidArgumentError("answer is not contiguous");
    }
  }
  // Encode first (no lock): one record per max_extents_per_record extents.
  leveldb::WriteBatch batch;
  uint64_t bytes = 0;
  const size_t per = std::max<size_t>(1, options_.max_extents_per_record);
  for (size_t i = 0; i < extents.size(); i += per) {
    blockmeta::store::ExtentRecord r;
    const size_t end = std::min(extents.size(), i + per);
    for (size_t j = i; j < end; ++j) {
      r.add_lengths(extents[j].length);
      r.add_flags(extents[j].flags);
    }
    std::string value = r.SerializeAsString();
    bytes += kRecordKeyBytes + value.size();
    batch.Put(RecordKey(slot, extents[i].offset), value);
  }
  const uint64_t records = (extents.size() + per - 1) / per;
  std::shared_ptr<leveldb::DB> db;
  std::vector<std::string> victims;
  {
    sync::MutexLock lock(&mu_);
    auto s = slots_.find(slot);
    if (db_ == nullptr || s == slots_.end()) return absl::OkStatus();
    if (bytes_ + bytes > options_.max_bytes &&
        !ChooseVictimsLocked(s->second.identity, bytes, &victims)) {
      writes_skipped_.fetch_add(1, std::memory_order_relaxed);
      return absl::ResourceExhaustedError("answer does not fit in the store");
    }
    db = db_;
    // Counted now so concurrent writers see the room as taken.
    s->second.bytes += bytes;
    s->second.records += records;
    s->second.extents += extents.size();
    bytes_ += bytes;
  }
  if (!victims.empty()) Evict(victims);
  leveldb::Status st = db->Write({}, &batch);
  if (!st.ok()) {
    writes_skipped_.fetch_add(1, std::memory_order_relaxed);
    OnDbError(db, "write", st.ToString());
    return FromLevelDb(st);
  }
  writes_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

bool ExtentStore::ChooseVictimsLocked(const std::string& writer, uint64_t need,
                                      std::vector<std::string>* victims) {
  if (need > options_.max_bytes) return false;
  struct Candidate {
    bool open;
    int64_t last_used_ns;
    uint64_t bytes;
    std::string identity;
  };
  std::vector<Candidate> c;
  for (const auto& [identity, st] : identities_) {
    if (identity == writer) continue;
    uint64_t b = 0;
    for (const auto& [context, slot] : st.slots) {
      auto s = slots_.find(slot);
      if (s != slots_.end()) b += s->second.bytes;
    }
    if (b > 0) c.push_back({st.open > 0, st.last_used_ns, b, identity});
  }
  // Closed identities first, then the least recently opened.
  std::sort(c.begin(), c.end(), [](const Candidate& a, const Candidate& b) {
    if (a.open != b.open) return !a.open;
    return a.last_used_ns < b.last_used_ns;
  });
  uint64_t freed = 0;
  size_t i = 0;
  while (bytes_ - freed + need > options_.max_bytes && i < c.size()) {
    freed += c[i].bytes;
    victims->push_back(c[i].identity);
    ++i;
  }
  if (bytes_ - freed + need > options_.max_bytes) {
    victims->clear();
    return false;
  }
  return true;
}

void ExtentStore::Evict(const std::vector<std::string>& victims) {
  for (const std::string& v : victims) {
    LogInfo("store_identity_evicted", {{"identity", v}});
    evicted_identities_.fetch_add(1, std::memory_order_relaxed);
    Drop(v);
  }
}

std::vector<uint32_t> ExtentStore::ForgetIdentityLocked(
    const std::string& identity) {
  std::vector<uint32_t> slots;
  auto it = identities_.find(identity);
  if (it == identities_.end()) return slots;
  for (const auto& [context, slot] : it->second.slots) {
    slots.push_back(slot);
    auto s = slots_.find(slot);
    if (s != slots_.end()) {
      bytes_ -= s->second.bytes;
      slots_.erase(s);
    }
  }
  // Keep the identity's open count (an open export makes new slots).
  it->second.slots.clear();
  if (it->second.open == 0) identities_.erase(it);
  return slots;
}

void ExtentStore::DiscardIdentity(const std::string& identity) {
  discarded_identities_.fetch_add(1, std::memory_order_relaxed);
  Drop(identity);
}

void ExtentStore::Drop(const std::string& identity) {
  std::shared_ptr<leveldb::DB> db;
  std::vector<uint32_t> slots;
  std::vector<std::string> contexts;
  {
    sync::MutexLock lock(&mu_);
    auto it = identities_.find(identity);
    if (it != identities_.end()) {
      for (const auto& [context, slot] : it->second.slots) {
        contexts.push_back(context);
      }
    }
    slots = ForgetIdentityLocked(identity);
    db = db_;
  }
  if (db == nullptr) return;
  // Names first (one batch): after it the records are unreachable, even if
  // the process dies before they are deleted.
  leveldb::WriteBatch names;
  for (const std::string& c : contexts) names.Delete(ContextKey(identity, c));
  names.Delete(IdentityKey(identity));
  if (leveldb::Status s = db->Write({}, &names); !s.ok()) {
    OnDbError(db, "discard", s.ToString());
    return;
  }
  for (uint32_t slot : slots) {
    std::unique_ptr<leveldb::Iterator> it(db->NewIterator({}));
    const std::string prefix = SlotPrefix(slot);
    leveldb::WriteBatch b;
    size_t n = 0;
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix);
         it->Next()) {
      b.Delete(it->key());
      if (++n % 4096 == 0) {
        db->Write({}, &b);
        b.Clear();
      }
    }
    it.reset();
    db->Write({}, &b);
  }
}

ExtentStoreStats ExtentStore::Stats() const {
  ExtentStoreStats s;
  {
    sync::MutexLock lock(&mu_);
    s.bytes = bytes_;
    for (const auto& [slot, st] : slots_) {
      s.records += st.records;
      s.extents += st.extents;
    }
    s.broken = broken_;
  }
  s.lookups_hit = lookups_hit_.load(std::memory_order_relaxed);
  s.lookups_missed = lookups_missed_.load(std::memory_order_relaxed);
  s.writes = writes_.load(std::memory_order_relaxed);
  s.writes_skipped = writes_skipped_.load(std::memory_order_relaxed);
  s.evicted_identities = evicted_identities_.load(std::memory_order_relaxed);
  s.discarded_identities =
      discarded_identities_.load(std::memory_order_relaxed);
  s.set_aside = set_aside_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace blockmeta
