// server/store/content_identity.cc — see content_identity.h.
#include "server/store/content_identity.h"

#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace blockmeta {

std::optional<std::string> ContentIdentity(
    const blockmeta::v1::ExportConfig& config) {
  if (!config.immutable()) return std::nullopt;
  if (!config.content_id().empty()) {
    return absl::StrCat("id:", config.content_id());
  }
  if (!config.csi().snapshot_id().empty()) {
    return absl::StrCat("csi:", config.csi().snapshot_id());
  }
  if (config.has_image()) {
    const auto& image = config.image();
    struct stat st;
    if (::stat(image.path().c_str(), &st) != 0) return std::nullopt;
    const int64_t mtime_ns =
        static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 +
        st.st_mtim.tv_nsec;
    return absl::StrCat("image:", st.st_dev, ":", st.st_ino, ":", st.st_size,
                        ":", mtime_ns, ":", image.format(), ":",
                        absl::StrJoin(image.bitmaps(), ","));
  }
  return std::nullopt;
}

}  // namespace blockmeta
