// server/store/content_identity_test.cc — identities from configs and image
// files: precedence, and a rewritten or replaced image changes it.
#include "server/store/content_identity.h"

#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

std::string TempImage(const std::string& name, const std::string& content) {
  std::string path = std::string(::testing::TempDir()) + "/" + name;
  std::ofstream(path, std::ios::trunc) << content;
  return path;
}

blockmeta::v1::ExportConfig ImageExport(const std::string& path) {
  blockmeta::v1::ExportConfig c;
  c.set_name("x");
  c.set_immutable(true);
  c.mutable_image()->set_path(path);
  return c;
}

TEST(ContentIdentityTest, NoneWhenNotImmutableOrNothingIdentifies) {
  blockmeta::v1::ExportConfig c;
  c.set_name("x");
  c.set_nbd_uri("nbd://localhost/x");
  c.set_content_id("abc");
  EXPECT_EQ(ContentIdentity(c), std::nullopt);  // not immutable
  c.set_immutable(true);
  c.clear_content_id();
  EXPECT_EQ(ContentIdentity(c), std::nullopt);  // a URI names no content
}

TEST(ContentIdentityTest, ExplicitIdThenCsiSnapshotId) {
  blockmeta::v1::ExportConfig c;
  c.set_immutable(true);
  c.set_nbd_uri("nbd://localhost/x");
  c.mutable_csi()->set_snapshot_id("snap-1");
  EXPECT_EQ(ContentIdentity(c), "csi:snap-1");
  c.set_content_id("disk-7@t1");
  EXPECT_EQ(ContentIdentity(c), "id:disk-7@t1");
}

TEST(ContentIdentityTest, ImageIdentityChangesWithMtimeInodeAndBitmaps) {
  std::string path = TempImage("img.raw", "aaaa");
  blockmeta::v1::ExportConfig c = ImageExport(path);
  std::optional<std::string> a = ContentIdentity(c);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(ContentIdentity(c), a);  // stable

  // Same size, same inode, another modification time.
  struct timeval times[2] = {{1000, 0}, {1000, 0}};
  ASSERT_EQ(::utimes(path.c_str(), times), 0);
  std::optional<std::string> b = ContentIdentity(c);
  ASSERT_TRUE(b.has_value());
  EXPECT_NE(a, b);

  // Replaced by another file (new inode) with the same mtime and size.
  std::string other = TempImage("img2.raw", "bbbb");
  ASSERT_EQ(::utimes(other.c_str(), times), 0);
  ASSERT_EQ(std::rename(other.c_str(), path.c_str()), 0);
  std::optional<std::string> d = ContentIdentity(c);
  ASSERT_TRUE(d.has_value());
  EXPECT_NE(b, d);

  c.mutable_image()->set_format("qcow2");
  c.mutable_image()->add_bitmaps("b1");
  EXPECT_NE(ContentIdentity(c), d);

  c.mutable_image()->set_path(path + ".missing");
  EXPECT_EQ(ContentIdentity(c), std::nullopt);
}

}  // namespace
}  // namespace blockmeta
