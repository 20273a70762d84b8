// server/store/content_identity.h — the content identity that keys an
// immutable export's answers in the store (never the export name alone).
//
// In order of precedence:
//   - an explicit ExportConfig.content_id:        "id:<content_id>"
//   - a CSI snapshot id (csi.snapshot_id):        "csi:<snapshot_id>"
//   - an image upstream: the file's identity,
//     device, inode, size, modification time (ns), format and the qcow2
//     bitmaps served:  "image:<dev>:<ino>:<size>:<mtime_ns>:<format>:<b1>,.."
// An export that is not immutable, or has none of these (an nbd_uri or
// command upstream without content_id or CSI id), has no identity and does
// not use the store.
//
// Rewriting an image in place (new mtime), replacing the file (new inode)
// or serving other bitmaps gives a new identity, so nothing persisted for
// the old content is served.
// Thread-safety: reentrant. Cost: one stat(2) for image upstreams.
#ifndef BLOCKMETA_SERVER_STORE_CONTENT_IDENTITY_H_
#define BLOCKMETA_SERVER_STORE_CONTENT_IDENTITY_H_

#include <optional>
#include <string>

#include "blockmeta/v1/config.pb.h"

namespace blockmeta {

// The identity, or nullopt (not immutable, no identity, or stat failed).
std::optional<std::string> ContentIdentity(
    const blockmeta::v1::ExportConfig& config);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_STORE_CONTENT_IDENTITY_H_
