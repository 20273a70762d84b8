// server/nbd/handshake.cc — fixed newstyle option haggling (see handshake.h).
#include "server/nbd/handshake.h"

#include <algorithm>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/cache/extent.h"
#include "server/nbd/protocol.h"

namespace blockmeta {
namespace nbd {
namespace {

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

struct BlockSizes {
  uint32_t min = 1, preferred = 4096, max = kDefaultMaxPayloadBytes;
};

// Block size constraints advertised in NBD_INFO_BLOCK_SIZE. The minimum
// and preferred sizes are the upstream's; the maximum is the configured
// payload cap (NbdShimConfig.max_payload_bytes, default 32 MiB) clamped to
// the upstream's advertised maximum, when it advertises one: a client
// then sees the limit it would see talking to the upstream (a request the
// upstream refuses is refused here, never split into pieces it did not
// agree to). Without an advertised maximum the cap may exceed 32 MiB (the
// Upstream splits data commands; the NBD project's integrity test uses
// 64 MiB).
BlockSizes ComputeBlockSizes(const UpstreamInfo& info, uint32_t max_payload) {
  BlockSizes b;
  b.min = info.minimum_block_size;
  if (!IsPowerOfTwo(b.min) || b.min > 65536) b.min = 1;
  uint32_t max = std::max<uint32_t>(max_payload, 512);
  if (info.maximum_block_size_advertised && info.maximum_block_size > 0) {
    max = std::min(max, info.maximum_block_size);
  }
  max -= max % b.min;
  if (max < b.min) max = b.min;
  b.max = max;
  uint32_t pref = info.preferred_block_size;
  if (!IsPowerOfTwo(pref) || pref < b.min)
    pref = std::max<uint32_t>(b.min, 4096);
  while (pref > b.max && pref / 2 >= b.min) pref /= 2;
  b.preferred = pref;
  return b;
}

class Handshaker {
 public:
  Handshaker(ByteStream& s, const std::vector<ShimExport>& exports,
             const HandshakeOptions& o, const StartTlsFn& start_tls,
             const ExportGateFn& gate)
      : stream_(&s),
        exports_(exports),
        options_(o),
        start_tls_(start_tls),
        gate_(gate) {}

  absl::StatusOr<Negotiated> Run();

 private:
  absl::Status Reply(uint32_t opt, uint32_t type, std::string_view data = {});
  const ShimExport* Find(std::string_view name) const;
  absl::StatusOr<UpstreamInfo> InfoOf(const ShimExport& e, bool enter) const;
  // Each handler returns OK to continue haggling; sets entered_ on GO.
  absl::Status InfoOrGo(uint32_t opt, const std::string& data);
  absl::Status MetaContext(uint32_t opt, const std::string& data);
  absl::Status List(const std::string& data);
  absl::Status ExportName(const std::string& data);
  absl::Status Enter(const ShimExport* e, const UpstreamInfo& info);

  absl::Status StartTls(const std::string& data);

  ByteStream* stream_;  // replaced by the TLS stream after STARTTLS
  const std::vector<ShimExport>& exports_;
  const HandshakeOptions& options_;
  const StartTlsFn& start_tls_;
  const ExportGateFn& gate_;
  bool tls_ = false;

  bool structured_ = false;
  bool no_zeroes_ = false;
  bool entered_ = false;
  // Last SET_META_CONTEXT: its export and what it selected.
  const ShimExport* meta_export_ = nullptr;
  std::vector<nbd::MetaContext> selected_;
  Negotiated result_;
};

absl::Status Handshaker::Reply(uint32_t opt, uint32_t type,
                               std::string_view data) {
  std::string msg;
  msg.reserve(20 + data.size());
  AppendBe64(&msg, kOptReplyMagic);
  AppendBe32(&msg, opt);
  AppendBe32(&msg, type);
  AppendBe32(&msg, static_cast<uint32_t>(data.size()));
  msg.append(data);
  return stream_->WriteAll(msg);
}

const ShimExport* Handshaker::Find(std::string_view name) const {
  // "" is the default export: the only one, when there is exactly one.
  if (name.empty() && exports_.size() == 1) return &exports_[0];
  auto it = std::lower_bound(
      exports_.begin(), exports_.end(), name,
      [](const ShimExport& e, std::string_view n) { return e.name < n; });
  if (it != exports_.end() && it->name == name) return &*it;
  return nullptr;
}

absl::StatusOr<UpstreamInfo> Handshaker::InfoOf(const ShimExport& e,
                                                bool enter) const {
  if (gate_) return gate_(e, enter);
  std::shared_ptr<Upstream> up = e.upstream.lock();
  if (up == nullptr) return absl::NotFoundError("export was removed");
  return up->Info();
}

absl::Status Handshaker::Enter(const ShimExport* e, const UpstreamInfo& info) {
  result_.export_entry = e;
  result_.info = info;
  result_.structured_replies = structured_;
  result_.no_zeroes = no_zeroes_;
  result_.transmission_flags =
      TransmissionFlags(info, e->read_only, structured_);
  BlockSizes b = ComputeBlockSizes(info, options_.max_payload_bytes);
  result_.min_block_size = b.min;
  result_.max_payload = b.max;
  result_.contexts.clear();
  if (structured_ && meta_export_ == e) {
    // Keep only contexts still offered (the upstream may have reconnected).
    std::vector<std::string> offered = OfferedContexts(info);
    for (const nbd::MetaContext& c : selected_) {
      if (std::find(offered.begin(), offered.end(), c.name) != offered.end()) {
        result_.contexts.push_back(c);
      }
    }
  }
  entered_ = true;
  return absl::OkStatus();
}

absl::Status Handshaker::InfoOrGo(uint32_t opt, const std::string& data) {
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  if (data.size() < 6) return Reply(opt, kRepErrInvalid, "option too short");
  uint32_t name_len = GetBe32(p);
  if (name_len > data.size() - 6) {
    return Reply(opt, kRepErrInvalid, "name length exceeds option length");
  }
  uint16_t n_info = GetBe16(p + 4 + name_len);
  if (data.size() != 6 + uint64_t{name_len} + 2 * uint64_t{n_info}) {
    return Reply(opt, kRepErrInvalid, "option length mismatch");
  }
  if (name_len > kMaxStringLength) {
    return Reply(opt, kRepErrInvalid, "export name longer than 4096 bytes");
  }
  std::string_view name(data.data() + 4, name_len);
  bool want_name = false, want_description = false;
  for (uint16_t i = 0; i < n_info; ++i) {
    uint16_t t = GetBe16(p + 6 + name_len + 2 * i);
    if (t == kInfoName) want_name = true;
    if (t == kInfoDescription) want_description = true;
  }
  const ShimExport* e = Find(name);
  if (e == nullptr) return Reply(opt, kRepErrUnknown, "unknown export");
  // GO: recorded as entered before any reply (see ExportGateFn).
  absl::StatusOr<UpstreamInfo> info = InfoOf(*e, opt == kOptGo);
  if (!info.ok()) {
    return Reply(opt, kRepErrUnknown, "export is not available right now");
  }
  std::string r;
  AppendBe16(&r, kInfoExport);
  AppendBe64(&r, info->size);
  AppendBe16(&r, TransmissionFlags(*info, e->read_only, structured_));
  if (absl::Status s = Reply(opt, kRepInfo, r); !s.ok()) return s;
  if (want_name) {
    r.clear();
    AppendBe16(&r, kInfoName);
    r.append(e->name);
    if (absl::Status s = Reply(opt, kRepInfo, r); !s.ok()) return s;
  }
  if (want_description && !e->description.empty()) {
    r.clear();
    AppendBe16(&r, kInfoDescription);
    r.append(e->description.substr(0, kMaxStringLength));
    if (absl::Status s = Reply(opt, kRepInfo, r); !s.ok()) return s;
  }
  BlockSizes b = ComputeBlockSizes(*info, options_.max_payload_bytes);
  r.clear();
  AppendBe16(&r, kInfoBlockSize);
  AppendBe32(&r, b.min);
  AppendBe32(&r, b.preferred);
  AppendBe32(&r, b.max);
  if (absl::Status s = Reply(opt, kRepInfo, r); !s.ok()) return s;
  if (absl::Status s = Reply(opt, kRepAck); !s.ok()) return s;
  if (opt == kOptGo) return Enter(e, *info);
  return absl::OkStatus();
}

absl::Status Handshaker::MetaContext(uint32_t opt, const std::string& data) {
  const bool set = opt == kOptSetMetaContext;
  if (set) {  // SET replaces the selection, even when it fails.
    meta_export_ = nullptr;
    selected_.clear();
  }
  if (!structured_) {
    return Reply(opt, kRepErrInvalid, "structured replies not negotiated");
  }
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  size_t pos = 0;
  auto read32 = [&](uint32_t* v) {
    if (data.size() - pos < 4) return false;
    *v = GetBe32(p + pos);
    pos += 4;
    return true;
  };
  uint32_t name_len = 0;
  if (!read32(&name_len) || name_len > data.size() - pos) {
    return Reply(opt, kRepErrInvalid, "malformed meta context option");
  }
  if (name_len > kMaxStringLength) {
    return Reply(opt, kRepErrInvalid, "export name longer than 4096 bytes");
  }
  std::string_view name(data.data() + pos, name_len);
  pos += name_len;
  uint32_t n_queries = 0;
  if (!read32(&n_queries)) {
    return Reply(opt, kRepErrInvalid, "malformed meta context option");
  }
  std::vector<std::string_view> queries;
  for (uint32_t i = 0; i < n_queries; ++i) {
    uint32_t len = 0;
    if (!read32(&len) || len > data.size() - pos) {
      return Reply(opt, kRepErrInvalid, "malformed meta context query");
    }
    if (len > kMaxStringLength) {
      return Reply(opt, kRepErrInvalid, "query longer than 4096 bytes");
    }
    queries.emplace_back(data.data() + pos, len);
    pos += len;
  }
  if (pos != data.size()) {
    return Reply(opt, kRepErrInvalid, "trailing bytes in meta context option");
  }
  const ShimExport* e = Find(name);
  if (e == nullptr) return Reply(opt, kRepErrUnknown, "unknown export");
  absl::StatusOr<UpstreamInfo> info = InfoOf(*e, /*enter=*/false);
  if (!info.ok()) {
    return Reply(opt, kRepErrUnknown, "export is not available right now");
  }
  const std::vector<std::string> offered = OfferedContexts(*info);
  std::vector<bool> chosen(offered.size(), false);
  if (queries.empty() && !set) chosen.assign(offered.size(), true);
  for (std::string_view q : queries) {
    for (size_t i = 0; i < offered.size(); ++i) {
      const std::string& c = offered[i];
      bool match = q == c;
      if (!set) {  // Wildcards are for LIST only.
        if (q == "base:" && c == kBaseAllocation) match = true;
        if ((q == "qemu:" || q == kDirtyBitmapPrefix) &&
            IsDirtyBitmapContext(c)) {
          match = true;
        }
      }
      if (match) chosen[i] = true;
    }
  }
  std::vector<nbd::MetaContext> picked;
  for (size_t i = 0; i < offered.size(); ++i) {
    if (!chosen[i]) continue;
    picked.push_back({static_cast<uint32_t>(i + 1), offered[i]});
    std::string r;
    AppendBe32(&r, static_cast<uint32_t>(i + 1));
    r.append(offered[i]);
    if (absl::Status s = Reply(opt, kRepMetaContext, r); !s.ok()) return s;
  }
  if (set) {
    meta_export_ = e;
    selected_ = std::move(picked);
  }
  return Reply(opt, kRepAck);
}

absl::Status Handshaker::List(const std::string& data) {
  if (!data.empty())
    return Reply(kOptList, kRepErrInvalid, "LIST takes no data");
  for (const ShimExport& e : exports_) {
    // An export being removed (its gate answers NOT_FOUND) is not listed:
    // GO and INFO on it would be refused. One that is only unavailable
    // (upstream reconnecting) still is.
    if (gate_ && absl::IsNotFound(gate_(e, /*enter=*/false).status())) {
      continue;
    }
    std::string r;
    AppendBe32(&r, static_cast<uint32_t>(e.name.size()));
    r.append(e.name);
    if (absl::Status s = Reply(kOptList, kRepServer, r); !s.ok()) return s;
  }
  return Reply(kOptList, kRepAck);
}

absl::Status Handshaker::ExportName(const std::string& data) {
  // This option cannot fail politely: any problem is a hard disconnect.
  if (data.size() > kMaxStringLength) {
    return absl::InvalidArgumentError("export name longer than 4096 bytes");
  }
  const ShimExport* e = Find(data);
  if (e == nullptr) return absl::NotFoundError("unknown export");
  absl::StatusOr<UpstreamInfo> info = InfoOf(*e, /*enter=*/true);
  if (!info.ok()) return absl::UnavailableError("export is not available");
  if (absl::Status s = Enter(e, *info); !s.ok()) return s;
  std::string r;
  AppendBe64(&r, info->size);
  AppendBe16(&r, result_.transmission_flags);
  if (!no_zeroes_) r.append(124, '\0');
  return stream_->WriteAll(r);
}

absl::Status Handshaker::StartTls(const std::string& data) {
  if (!data.empty()) {
    return Reply(kOptStartTls, kRepErrInvalid, "STARTTLS takes no data");
  }
  if (options_.tls == TlsMode::kOff || !start_tls_) {
    return Reply(kOptStartTls, kRepErrPolicy, "TLS is not offered");
  }
  if (tls_) return Reply(kOptStartTls, kRepErrInvalid, "TLS is already on");
  if (absl::Status s = Reply(kOptStartTls, kRepAck); !s.ok()) return s;
  absl::StatusOr<ByteStream*> tls = start_tls_();
  if (!tls.ok()) return tls.status();  // a failed TLS handshake: hang up
  stream_ = *tls;
  tls_ = true;
  // Nothing negotiated in plaintext survives STARTTLS: a man in the middle
  // could have injected it (nbdkit CVE-2021-3716). Client flags were sent
  // before any option and stay.
  structured_ = false;
  meta_export_ = nullptr;
  selected_.clear();
  return absl::OkStatus();
}

absl::StatusOr<Negotiated> Handshaker::Run() {
  std::string greeting;
  AppendBe64(&greeting, kNbdMagic);
  AppendBe64(&greeting, kIHaveOpt);
  AppendBe16(&greeting, kFlagFixedNewstyle | kFlagNoZeroes);
  if (absl::Status s = stream_->WriteAll(greeting); !s.ok()) return s;
  uint8_t cflags_buf[4];
  if (absl::Status s = stream_->ReadFull(cflags_buf, 4); !s.ok()) return s;
  const uint32_t cflags = GetBe32(cflags_buf);
  if (cflags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) {
    return absl::InvalidArgumentError("unknown client flags");
  }
  no_zeroes_ = (cflags & kClientFlagNoZeroes) != 0;

  while (!entered_) {
    uint8_t hdr[16];
    if (absl::Status s = stream_->ReadFull(hdr, sizeof hdr); !s.ok()) return s;
    if (GetBe64(hdr) != kIHaveOpt) {
      return absl::InvalidArgumentError("bad option magic");
    }
    const uint32_t opt = GetBe32(hdr + 8);
    const uint32_t len = GetBe32(hdr + 12);
    if (len > options_.max_option_length) {
      // Never read (or allocate) a huge option: refuse and hang up.
      if (opt != kOptExportName) {
        Reply(opt, kRepErrTooBig, "option too long").IgnoreError();
      }
      return absl::InvalidArgumentError(
          absl::StrCat("option ", opt, " length ", len, " exceeds the cap"));
    }
    std::string data(len, '\0');
    if (absl::Status s = stream_->ReadFull(data.data(), len); !s.ok()) return s;

    absl::Status s;
    if (options_.tls == TlsMode::kRequire && !tls_ && opt != kOptStartTls &&
        opt != kOptAbort) {
      // Nothing but STARTTLS before TLS (doc/proto.md "forced TLS");
      // EXPORT_NAME cannot be refused politely: hang up.
      if (opt == kOptExportName) {
        return absl::PermissionDeniedError("TLS required before EXPORT_NAME");
      }
      s = Reply(opt, kRepErrTlsReqd, "TLS is required: use NBD_OPT_STARTTLS");
      if (!s.ok()) return s;
      continue;
    }
    switch (opt) {
      case kOptExportName:
        s = ExportName(data);
        if (!s.ok()) return s;
        break;
      case kOptAbort:
        // Best effort: the client may already be gone.
        Reply(opt, kRepAck).IgnoreError();
        return absl::CancelledError("client aborted the handshake");
      case kOptList:
        s = List(data);
        break;
      case kOptStartTls:
        s = StartTls(data);
        break;
      case kOptInfo:
      case kOptGo:
        s = InfoOrGo(opt, data);
        break;
      case kOptStructuredReply:
        if (!data.empty()) {
          s = Reply(opt, kRepErrInvalid, "STRUCTURED_REPLY takes no data");
        } else {
          structured_ = true;
          s = Reply(opt, kRepAck);
        }
        break;
      case kOptListMetaContext:
      case kOptSetMetaContext:
        s = MetaContext(opt, data);
        break;
      default:
        s = Reply(opt, kRepErrUnsup, "option not supported");
        break;
    }
    if (!s.ok()) return s;
  }
  result_.tls = tls_;
  return std::move(result_);
}

}  // namespace

std::vector<std::string> OfferedContexts(const UpstreamInfo& info) {
  std::vector<std::string> out = {std::string(kBaseAllocation)};
  for (const std::string& c : info.contexts) {
    if (IsDirtyBitmapContext(c) && c.size() > kDirtyBitmapPrefix.size() &&
        c.size() <= kMaxStringLength &&
        std::find(out.begin(), out.end(), c) == out.end()) {
      out.push_back(c);
    }
  }
  return out;
}

uint16_t TransmissionFlags(const UpstreamInfo& info, bool config_read_only,
                           bool structured_replies) {
  const bool ro = info.read_only || config_read_only;
  uint16_t f = kFlagHasFlags;
  if (ro) f |= kFlagReadOnly;
  if (info.can_flush) f |= kFlagSendFlush;
  if (info.can_fua && !ro) f |= kFlagSendFua;
  if (info.can_trim && !ro) f |= kFlagSendTrim;
  if (info.can_zero && !ro) f |= kFlagSendWriteZeroes;
  if (info.can_zero && info.can_fast_zero && !ro) f |= kFlagSendFastZero;
  if (structured_replies) f |= kFlagSendDf;
  if (info.can_multi_conn) f |= kFlagCanMultiConn;
  if (info.can_cache) f |= kFlagSendCache;
  return f;
}

absl::StatusOr<Negotiated> RunHandshake(ByteStream& stream,
                                        const std::vector<ShimExport>& exports,
                                        const HandshakeOptions& options,
                                        const StartTlsFn& start_tls,
                                        const ExportGateFn& gate) {
  return Handshaker(stream, exports, options, start_tls, gate).Run();
}

}  // namespace nbd
}  // namespace blockmeta
