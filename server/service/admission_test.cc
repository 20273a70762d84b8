// server/service/admission_test.cc
#include "server/service/admission.h"

#include <string>
#include <utility>
#include <vector>

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

TEST(AdmissionTest, OneFloodedExportCannotTakeEveryTicket) {
  Admission a(10, 3);
  std::vector<Admission::Ticket> slow;
  slow.reserve(3);
  for (int i = 0; i < 3; ++i) slow.push_back(a.TryAcquire("slow"));
  for (const auto& t : slow) EXPECT_TRUE(t);
  EXPECT_FALSE(a.TryAcquire("slow"));
  EXPECT_EQ(a.refused_export(), 1u);
  EXPECT_EQ(a.in_flight(), 3u);  // the refusal gave its global slot back
  EXPECT_EQ(a.in_flight("slow"), 3u);
  // Another export still gets in, up to the global limit.
  std::vector<Admission::Ticket> fast;
  fast.reserve(3);
  for (int i = 0; i < 3; ++i) fast.push_back(a.TryAcquire("fast"));
  for (const auto& t : fast) EXPECT_TRUE(t);
  slow.clear();
  EXPECT_EQ(a.in_flight("slow"), 0u);
  EXPECT_EQ(a.in_flight(), 3u);
  EXPECT_TRUE(a.TryAcquire("slow"));
}

TEST(AdmissionTest, GlobalLimitStillHolds) {
  Admission a(4, 4);
  std::vector<Admission::Ticket> t;
  t.reserve(4);
  for (int i = 0; i < 4; ++i) t.push_back(a.TryAcquire(std::to_string(i)));
  EXPECT_FALSE(a.TryAcquire("x"));
  EXPECT_EQ(a.refused_global(), 1u);
  EXPECT_EQ(a.in_flight("x"), 0u);
}

TEST(AdmissionTest, AStreamAttachesItsExportAfterAdmission) {
  Admission a(10, 1);
  Admission::Ticket first = a.TryAcquire();
  ASSERT_TRUE(a.TryAttachExport(&first, "e"));
  EXPECT_EQ(a.in_flight("e"), 1u);
  Admission::Ticket second = a.TryAcquire();
  EXPECT_FALSE(a.TryAttachExport(&second, "e"));  // e is at its limit
  EXPECT_EQ(a.in_flight(), 2u);
  second.Release();
  first.Release();
  EXPECT_EQ(a.in_flight("e"), 0u);
  EXPECT_EQ(a.in_flight(), 0u);
}

TEST(AdmissionTest, DefaultPerExportLimitIsHalf) {
  EXPECT_EQ(Admission(256).per_export_limit(), 128u);
  EXPECT_EQ(Admission(1).per_export_limit(), 1u);
}

}  // namespace
}  // namespace blockmeta
