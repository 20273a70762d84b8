// server/nbd/refusal.cc — the polite refusal handshake (see refusal.h).
#include "server/nbd/refusal.h"

#include <algorithm>
#include <utility>

#include "server/nbd/protocol.h"

namespace blockmeta {
namespace nbd {

namespace {

// The message goes out in every option reply: at most 4 KiB of it.
std::string Bounded(std::string message) {
  if (message.size() > 4096) message.resize(4096);
  return message;
}

}  // namespace

Refusal::Refusal(std::string message) : message_(Bounded(std::move(message))) {}

std::string Refusal::Greeting() const {
  std::string s;
  AppendBe64(&s, kNbdMagic);
  AppendBe64(&s, kIHaveOpt);
  AppendBe16(&s, kFlagFixedNewstyle | kFlagNoZeroes);
  return s;
}

void Refusal::Reply(uint32_t option, uint32_t type, std::string* out) const {
  const bool error = (type & kRepErrBit) != 0;
  AppendBe64(out, kOptReplyMagic);
  AppendBe32(out, option);
  AppendBe32(out, type);
  AppendBe32(out, error ? static_cast<uint32_t>(message_.size()) : 0);
  if (error) out->append(message_);
}

bool Refusal::Feed(std::string_view in, std::string* out) {
  for (;;) {
    if (state_ == State::kDone) return false;
    // An option without payload is answered as soon as its header is in.
    if (in.empty() && !(state_ == State::kOptionData && skip_ == 0)) {
      return true;
    }
    switch (state_) {
      case State::kDone:
        return false;
      case State::kFlags: {
        const size_t take = std::min(in.size(), 4 - pending_.size());
        pending_.append(in.substr(0, take));
        in.remove_prefix(take);
        if (pending_.size() < 4) return true;
        const uint32_t flags =
            GetBe32(reinterpret_cast<const uint8_t*>(pending_.data()));
        pending_.clear();
        if ((flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) != 0) {
          state_ = State::kDone;  // the spec's MUST: close
          break;
        }
        state_ = State::kOptionHeader;
        break;
      }
      case State::kOptionHeader: {
        const size_t take = std::min(in.size(), 16 - pending_.size());
        pending_.append(in.substr(0, take));
        in.remove_prefix(take);
        if (pending_.size() < 16) return true;
        const auto* p = reinterpret_cast<const uint8_t*>(pending_.data());
        const uint64_t magic = GetBe64(p);
        option_ = GetBe32(p + 8);
        skip_ = GetBe32(p + 12);
        pending_.clear();
        if (magic != kIHaveOpt || option_ == kOptExportName ||
            skip_ > kMaxOptionLength || ++options_ > kMaxOptions) {
          state_ = State::kDone;  // no error reply possible, or abuse
          break;
        }
        state_ = State::kOptionData;
        break;
      }
      case State::kOptionData: {
        const size_t take =
            static_cast<size_t>(std::min<uint64_t>(in.size(), skip_));
        in.remove_prefix(take);
        skip_ -= take;
        if (skip_ > 0) return true;
        if (option_ == kOptAbort) {
          Reply(option_, kRepAck, out);
          state_ = State::kDone;
          break;
        }
        Reply(option_, kRepErrShutdown, out);
        state_ = State::kOptionHeader;
        break;
      }
    }
  }
}

}  // namespace nbd
}  // namespace blockmeta
