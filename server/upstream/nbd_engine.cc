// server/upstream/nbd_engine.cc — see nbd_engine.h.
#include "server/upstream/nbd_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace {

constexpr absl::Duration kTick = absl::Milliseconds(100);
constexpr int kDefaultDrivers = 2;

thread_local const NbdEngine* tls_engine = nullptr;
// The NbdDriven whose callback this driver thread is running.
thread_local const NbdDriven* tls_current = nullptr;

ino_t SocketInode(int fd) {
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) return 0;
  return st.st_ino;
}

}  // namespace

NbdEngine& NbdEngine::Default() {
  static NbdEngine* engine = new NbdEngine(kDefaultDrivers);
  return *engine;
}

NbdEngine::NbdEngine(int drivers) {
  for (int i = 0; i < std::max(drivers, 1); ++i) {
    auto d = std::make_unique<Driver>();
    d->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    d->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;  // id 0: the wake eventfd
    epoll_ctl(d->epoll_fd, EPOLL_CTL_ADD, d->wake_fd, &ev);
    drivers_.push_back(std::move(d));
  }
  for (auto& d : drivers_) {
    Driver* raw = d.get();
    d->thread = std::thread([this, raw] { DriverLoop(raw); });
  }
  timer_ = std::thread([this] { TimerLoop(); });
}

NbdEngine::~NbdEngine() {
  {
    sync::MutexLock lock(&mu_);
    stop_ = true;
    timer_cv_.SignalAll();
  }
  for (auto& d : drivers_) {
    {
      sync::MutexLock lock(&d->mu);
      d->stop = true;
    }
    const uint64_t one = 1;
    (void)!write(d->wake_fd, &one, sizeof one);
  }
  for (auto& d : drivers_) d->thread.join();
  timer_.join();
  for (auto& d : drivers_) {
    close(d->wake_fd);
    close(d->epoll_fd);
  }
}

bool NbdEngine::OnEngineThread() const { return tls_engine == this; }

uint32_t NbdEngine::WantedEvents(nbd_handle* h) {
  const unsigned dir = nbd_aio_get_direction(h);
  uint32_t ev = 0;
  // Read interest also reports EOF and a half-closed socket (EPOLLRDHUP) at
  // once, idle or busy. Interest only in what libnbd asks for: a readable
  // socket libnbd is not ready to read would wake the driver in a loop.
  if (dir & LIBNBD_AIO_DIRECTION_READ) ev |= EPOLLIN | EPOLLRDHUP;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) ev |= EPOLLOUT;
  return ev;  // EPOLLHUP / EPOLLERR are always reported
}

absl::Status NbdEngine::RegisterLocked(NbdDriven* x, int di, int fd) {
  x->arm_mu_.AssertHeld();
  Driver* d = drivers_[di].get();
  uint64_t id;
  {
    sync::MutexLock lock(&mu_);
    id = next_id_++;
  }
  epoll_event ev{};
  ev.events = WantedEvents(x->handle());
  ev.data.u64 = id;
  if (epoll_ctl(d->epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("epoll_ctl: ", ErrnoText(err)));
  }
  x->driver_ = di;
  x->id_ = id;
  x->fd_ = fd;
  x->armed_ = ev.events;
  return absl::OkStatus();
}

absl::Status NbdEngine::Watch(const std::shared_ptr<NbdDriven>& x) {
  const int raw = nbd_aio_get_fd(x->handle());
  if (raw < 0) {
    return absl::FailedPreconditionError("libnbd handle has no socket");
  }
  const int fd = fcntl(raw, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("dup: ", ErrnoText(errno)));
  }
  int di;
  {
    sync::MutexLock lock(&mu_);
    di = next_driver_;
    next_driver_ = (next_driver_ + 1) % static_cast<int>(drivers_.size());
  }
  uint64_t id;
  {
    sync::MutexLock lock(&x->arm_mu_);
    absl::Status s = RegisterLocked(x.get(), di, fd);
    if (!s.ok()) return s;
    id = x->id_;
  }
  Driver* d = drivers_[di].get();
  sync::MutexLock lock(&d->mu);
  d->watched.emplace(id, x);
  return absl::OkStatus();
}

void NbdEngine::Rearm(NbdDriven* x) {
  sync::MutexLock lock(&x->arm_mu_);
  if (x->fd_ < 0) return;
  const uint32_t want = WantedEvents(x->handle());
  if (want == x->armed_) return;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = x->id_;
  if (epoll_ctl(drivers_[x->driver_]->epoll_fd, EPOLL_CTL_MOD, x->fd_, &ev) ==
      0) {
    x->armed_ = want;
  }
}

void NbdEngine::Refresh(NbdDriven* x) {
  const int raw = nbd_aio_get_fd(x->handle());
  if (raw < 0) return;
  sync::MutexLock lock(&x->arm_mu_);
  if (x->fd_ < 0 || SocketInode(raw) == SocketInode(x->fd_)) return;
  const int fd = fcntl(raw, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return;
  Driver* d = drivers_[x->driver_].get();
  epoll_ctl(d->epoll_fd, EPOLL_CTL_DEL, x->fd_, nullptr);
  close(x->fd_);
  x->fd_ = -1;
  // Same id: the driver's map entry stays valid.
  epoll_event ev{};
  ev.events = WantedEvents(x->handle());
  ev.data.u64 = x->id_;
  if (epoll_ctl(d->epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    close(fd);
    return;
  }
  x->fd_ = fd;
  x->armed_ = ev.events;
}

void NbdEngine::Unwatch(NbdDriven* x) {
  int di;
  uint64_t id;
  {
    sync::MutexLock lock(&x->arm_mu_);
    if (x->driver_ < 0) return;  // never watched
    di = x->driver_;
    id = x->id_;
    if (x->fd_ >= 0) {
      epoll_ctl(drivers_[di]->epoll_fd, EPOLL_CTL_DEL, x->fd_, nullptr);
      close(x->fd_);
      x->fd_ = -1;
    }
  }
  // Even when already unwatched (by its own callback, say), wait until no
  // driver is inside a callback for it.
  Driver* d = drivers_[di].get();
  // `keep` must not be the last reference while d->mu is held (the owner's
  // destructor runs then); it is dropped after the lock.
  std::shared_ptr<NbdDriven> keep;
  {
    sync::MutexLock lock(&d->mu);
    auto it = d->watched.find(id);
    if (it != d->watched.end()) {
      keep = std::move(it->second);
      d->watched.erase(it);
    }
    if (tls_current != x) {  // not from x's own callback
      while (d->busy == x) {
        d->mu.WaitWithDeadline(&d->cv, absl::InfiniteFuture());
      }
    }
  }
}

template <typename Fn>
void NbdEngine::CallBusy(Driver* d, uint64_t id, Fn fn) {
  std::shared_ptr<NbdDriven> x;
  {
    sync::MutexLock lock(&d->mu);
    auto it = d->watched.find(id);
    if (it == d->watched.end()) return;  // unwatched meanwhile
    x = it->second;
    d->busy = x.get();
  }
  tls_current = x.get();
  fn(x.get());
  tls_current = nullptr;
  // `x` may be the last reference: its destructor runs here, unlocked, and
  // before busy is cleared, so that Unwatch() also waits for it.
  x.reset();
  {
    sync::MutexLock lock(&d->mu);
    d->busy = nullptr;
    d->cv.SignalAll();
  }
}

void NbdEngine::DriverLoop(Driver* d) {
  tls_engine = this;
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  absl::Time next_tick = absl::Now() + kTick;
  while (true) {
    {
      sync::MutexLock lock(&d->mu);
      if (d->stop) return;
    }
    const int ms = static_cast<int>(std::max<int64_t>(
        1, absl::ToInt64Milliseconds(next_tick - absl::Now()) + 1));
    const int n = epoll_wait(d->epoll_fd, events, kMaxEvents, ms);
    for (int i = 0; i < n; ++i) {
      const uint64_t id = events[i].data.u64;
      const uint32_t rev = events[i].events;
      if (id == 0) {
        uint64_t v;
        (void)!read(d->wake_fd, &v, sizeof v);
        continue;
      }
      CallBusy(d, id, [&](NbdDriven* x) {
        nbd_handle* h = x->handle();
        std::string error;
        const unsigned dir = nbd_aio_get_direction(h);
        const bool in = (rev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR));
        const bool out = (rev & (EPOLLOUT | EPOLLHUP | EPOLLERR));
        if (in && (dir & LIBNBD_AIO_DIRECTION_READ)) {
          if (nbd_aio_notify_read(h) == -1) error = nbd_get_error();
        }
        if (error.empty() && out &&
            (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE)) {
          if (nbd_aio_notify_write(h) == -1) error = nbd_get_error();
        }
        x->OnEvents(error);
        Rearm(x);
      });
    }
    const absl::Time now = absl::Now();
    if (now >= next_tick) {
      next_tick = now + kTick;
      std::vector<uint64_t> ids;
      {
        sync::MutexLock lock(&d->mu);
        ids.reserve(d->watched.size());
        for (const auto& [id, x] : d->watched) ids.push_back(id);
      }
      for (uint64_t id : ids) {
        CallBusy(d, id, [&](NbdDriven* x) {
          x->OnTick(now);
          Rearm(x);
        });
      }
    }
  }
}

void NbdEngine::RunAt(absl::Time when, std::function<void()> fn) {
  sync::MutexLock lock(&mu_);
  tasks_.push(Task{when, next_seq_++, std::move(fn)});
  timer_cv_.SignalAll();
}

void NbdEngine::TimerLoop() {
  tls_engine = this;
  while (true) {
    std::function<void()> fn;
    {
      sync::MutexLock lock(&mu_);
      while (!stop_) {
        const absl::Time wake =
            tasks_.empty() ? absl::InfiniteFuture() : tasks_.top().when;
        if (wake <= absl::Now()) break;
        mu_.WaitWithDeadline(&timer_cv_, wake);
      }
      if (stop_) return;
      fn = std::move(const_cast<Task&>(tasks_.top()).fn);
      tasks_.pop();
    }
    fn();
  }
}

}  // namespace blockmeta
