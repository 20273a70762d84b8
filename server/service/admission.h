// server/service/admission.h — caps the number of gRPC calls in flight.
//
// gRPC's callback server has no admission control of its own; without one
// a burst of slow cache misses queues without bound. Each call takes a
// Ticket; when `limit` are out, TryAcquire() fails and the call is answered
// RESOURCE_EXHAUSTED at once. Lock-free (one atomic counter).
#ifndef BLOCKMETA_SERVER_SERVICE_ADMISSION_H_
#define BLOCKMETA_SERVER_SERVICE_ADMISSION_H_

#include <atomic>
#include <cstdint>

namespace blockmeta {

class Admission {
 public:
  explicit Admission(uint32_t limit) : limit_(limit == 0 ? 1 : limit) {}

  // RAII ticket; empty (false) when admission was refused.
  class Ticket {
   public:
    Ticket() = default;
    explicit Ticket(Admission* a) : owner_(a) {}
    Ticket(Ticket&& o) noexcept : owner_(o.owner_) { o.owner_ = nullptr; }
    Ticket& operator=(Ticket&& o) noexcept {
      Release();
      owner_ = o.owner_;
      o.owner_ = nullptr;
      return *this;
    }
    ~Ticket() { Release(); }
    explicit operator bool() const { return owner_ != nullptr; }
    void Release() {
      if (owner_ != nullptr) owner_->in_flight_.fetch_sub(1);
      owner_ = nullptr;
    }

   private:
    Admission* owner_ = nullptr;
  };

  Ticket TryAcquire() {
    uint32_t now = in_flight_.fetch_add(1) + 1;
    if (now > limit_) {
      in_flight_.fetch_sub(1);
      return Ticket();
    }
    return Ticket(this);
  }

  uint32_t in_flight() const { return in_flight_.load(); }
  uint32_t limit() const { return limit_; }

 private:
  const uint32_t limit_;
  std::atomic<uint32_t> in_flight_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_ADMISSION_H_
