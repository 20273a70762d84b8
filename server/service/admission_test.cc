// server/service/admission_test.cc
#include "server/service/admission.h"

#include <utility>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

TEST(AdmissionTest, RefusesBeyondLimitAndReleasesOnDestruction) {
  Admission a(2);
  Admission::Ticket t1 = a.TryAcquire();
  Admission::Ticket t2 = a.TryAcquire();
  EXPECT_TRUE(t1);
  EXPECT_TRUE(t2);
  EXPECT_FALSE(a.TryAcquire());
  EXPECT_EQ(a.in_flight(), 2u);
  t1.Release();
  EXPECT_EQ(a.in_flight(), 1u);
  {
    Admission::Ticket t3 = a.TryAcquire();
    EXPECT_TRUE(t3);
    EXPECT_FALSE(a.TryAcquire());
  }
  EXPECT_EQ(a.in_flight(), 1u);
}

TEST(AdmissionTest, MovedTicketReleasesOnce) {
  Admission a(1);
  Admission::Ticket t = a.TryAcquire();
  Admission::Ticket moved = std::move(t);
  EXPECT_FALSE(t);  // NOLINT(bugprone-use-after-move): checking moved-from
  EXPECT_TRUE(moved);
  moved.Release();
  moved.Release();
  EXPECT_EQ(a.in_flight(), 0u);
  EXPECT_TRUE(a.TryAcquire());
}

}  // namespace
}  // namespace blockmeta
