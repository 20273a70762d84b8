// tests/nbd/shim_errors_test.cc — NBD errors keep their meaning through
// the shim: an upstream (nbdkit's error filter) that fails every read,
// write and block-status command with one NBD error, served through the
// shim to a real libnbd client, which must see the same error
// (doc/proto.md "Error values"; libnbd turns the wire value into errno).
#include <errno.h>
#include <libnbd.h>

#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/shim_rig.h"

namespace blockmeta {
namespace {

struct Case {
  const char* name;  // what nbdkit's error= takes
  int err;           // the errno libnbd reports for it
};

class ShimErrorsTest : public ::testing::TestWithParam<Case> {};

int ExtentCb(void*, const char*, uint64_t, uint32_t*, size_t, int*) {
  return 0;
}

struct HandleCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};

// A fresh upstream and shim per command, so that an error which makes the
// upstream connection close (ESHUTDOWN) is seen by each command kind.
std::unique_ptr<nbd_handle, HandleCloser> Serve(
    const Case& c, std::unique_ptr<testing::ShimRig>* rig) {
  auto r = testing::StartShimRig(
      {"nbdkit", "-U", "{sock}", "-f", "--filter=error", "memory", "4M",
       absl::StrCat("error=", c.name), "error-pread-rate=100%",
       "error-pwrite-rate=100%", "error-extents-rate=100%"},
      "x");
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return nullptr;
  *rig = *std::move(r);
  std::unique_ptr<nbd_handle, HandleCloser> h(nbd_create());
  EXPECT_NE(h, nullptr);
  if (h == nullptr) return h;
  EXPECT_EQ(nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 0);
  if (nbd_connect_uri(h.get(), (*rig)->Uri().c_str()) != 0) {
    ADD_FAILURE() << nbd_get_error();
    return nullptr;
  }
  return h;
}

TEST_P(ShimErrorsTest, UpstreamErrorReachesTheClientUnchanged) {
  const Case& c = GetParam();
  char buf[4096];
  std::memset(buf, 0, sizeof buf);
  {
    std::unique_ptr<testing::ShimRig> rig;
    auto h = Serve(c, &rig);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(nbd_pread(h.get(), buf, sizeof buf, 0, 0), -1);
    EXPECT_EQ(nbd_get_errno(), c.err)
        << c.name << " pread: " << nbd_get_error();
  }
  {
    std::unique_ptr<testing::ShimRig> rig;
    auto h = Serve(c, &rig);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(nbd_pwrite(h.get(), buf, sizeof buf, 0, 0), -1);
    EXPECT_EQ(nbd_get_errno(), c.err)
        << c.name << " pwrite: " << nbd_get_error();
  }
  {
    std::unique_ptr<testing::ShimRig> rig;
    auto h = Serve(c, &rig);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(
        nbd_block_status(h.get(), 1 << 20, 0,
                         nbd_extent_callback{ExtentCb, nullptr, nullptr}, 0),
        -1);
    EXPECT_EQ(nbd_get_errno(), c.err)
        << c.name << " block status: " << nbd_get_error();
  }
}

// Every value nbdkit 1.32's error filter can inject.
INSTANTIATE_TEST_SUITE_P(
    NbdErrors, ShimErrorsTest,
    ::testing::Values(Case{"EPERM", EPERM}, Case{"EIO", EIO},
                      Case{"ENOMEM", ENOMEM}, Case{"EINVAL", EINVAL},
                      Case{"ENOSPC", ENOSPC}, Case{"ESHUTDOWN", ESHUTDOWN}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(info.param.name);
    });

}  // namespace
}  // namespace blockmeta
