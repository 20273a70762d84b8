// server/cache/cache_key.h — the cache's key: (export, metadata context).
//
// Keys never mix: two exports, or two contexts of one export, are two keys.
#ifndef BLOCKMETA_SERVER_CACHE_CACHE_KEY_H_
#define BLOCKMETA_SERVER_CACHE_CACHE_KEY_H_

#include <string>
#include <utility>

namespace blockmeta {

struct CacheKey {
  std::string export_name;
  std::string context;  // e.g. "base:allocation", "qemu:dirty-bitmap:b1"

  template <typename H>
  friend H AbslHashValue(H h, const CacheKey& k) {
    return H::combine(std::move(h), k.export_name, k.context);
  }
  friend bool operator==(const CacheKey& a, const CacheKey& b) {
    return a.export_name == b.export_name && a.context == b.context;
  }
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_CACHE_KEY_H_
