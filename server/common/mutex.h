// server/common/mutex.h — absl::Mutex that ThreadSanitizer can see.
//
// Debian's libabsl is not built with -fsanitize=thread, so TSan sees neither
// the acquire/release inside absl::Mutex nor the annotations absl would add
// for an instrumented build: every access guarded by an absl::Mutex shows up
// as a (false) data race in our own frames, which no suppression of library
// frames can silence. sync::Mutex wraps absl::Mutex and, in TSan builds
// only, tells TSan about each lock and unlock with the __tsan_mutex_*
// annotations (reader locks as read locks, so readers do not synchronize
// with each other and races under a shared lock stay visible). In other
// builds it compiles to plain absl::Mutex calls.
//
// Thread-safety annotations are the same as absl's (ABSL_LOCKABLE,
// ABSL_SCOPED_LOCKABLE), so clang -Wthread-safety checks ABSL_GUARDED_BY
// fields guarded by a sync::Mutex. Waiting on an absl::CondVar goes through
// Mutex::WaitWithDeadline so that TSan sees the release and re-acquire.
#ifndef BLOCKMETA_SERVER_COMMON_MUTEX_H_
#define BLOCKMETA_SERVER_COMMON_MUTEX_H_

#include "absl/base/config.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#ifdef ABSL_HAVE_THREAD_SANITIZER
#include <sanitizer/tsan_interface.h>
#define BLOCKMETA_TSAN(call) call
#else
#define BLOCKMETA_TSAN(call)
#endif

namespace blockmeta {
namespace sync {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() { BLOCKMETA_TSAN(__tsan_mutex_create(this, 0)); }
  ~Mutex() { BLOCKMETA_TSAN(__tsan_mutex_destroy(this, 0)); }
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    BLOCKMETA_TSAN(__tsan_mutex_pre_lock(this, 0));
    mu_.Lock();
    BLOCKMETA_TSAN(__tsan_mutex_post_lock(this, 0, 0));
  }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    BLOCKMETA_TSAN(__tsan_mutex_pre_unlock(this, 0));
    mu_.Unlock();
    BLOCKMETA_TSAN(__tsan_mutex_post_unlock(this, 0));
  }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() {
    BLOCKMETA_TSAN(__tsan_mutex_pre_lock(this, __tsan_mutex_read_lock));
    mu_.ReaderLock();
    BLOCKMETA_TSAN(__tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0));
  }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() {
    BLOCKMETA_TSAN(__tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock));
    mu_.ReaderUnlock();
    BLOCKMETA_TSAN(__tsan_mutex_post_unlock(this, __tsan_mutex_read_lock));
  }

  // Crashes with a diagnostic unless the mutex is held exclusively (absl
  // checks that some thread holds it as a writer; debug builds of absl
  // check that it is this thread). Call it first in every *Locked helper:
  // clang's -Wthread-safety checks the callers at compile time, this checks
  // them under gcc and at run time. Tells the analysis the lock is held.
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() { mu_.AssertHeld(); }
  // The same for a reader (or writer) hold.
  void AssertReaderHeld() const ABSL_ASSERT_SHARED_LOCK() {
    mu_.AssertReaderHeld();
  }

  // cv->WaitWithDeadline on this mutex (held exclusively): releases it while
  // waiting and holds it again on return. True if the deadline passed.
  bool WaitWithDeadline(absl::CondVar* cv, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    BLOCKMETA_TSAN(__tsan_mutex_pre_unlock(this, 0));
    BLOCKMETA_TSAN(__tsan_mutex_post_unlock(this, 0));
    const bool timed_out = cv->WaitWithDeadline(&mu_, deadline);
    BLOCKMETA_TSAN(__tsan_mutex_pre_lock(this, 0));
    BLOCKMETA_TSAN(__tsan_mutex_post_lock(this, 0, 0));
    return timed_out;
  }

 private:
  absl::Mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->Lock();
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

class ABSL_SCOPED_LOCKABLE ReaderMutexLock {
 public:
  explicit ReaderMutexLock(Mutex* mu) ABSL_SHARED_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->ReaderLock();
  }
  ~ReaderMutexLock() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace sync
}  // namespace blockmeta

#undef BLOCKMETA_TSAN

#endif  // BLOCKMETA_SERVER_COMMON_MUTEX_H_
