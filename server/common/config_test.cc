// server/common/config_test.cc — text-proto config loading and its errors.
#include "server/common/config.h"

#include <cstdio>
#include <fstream>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

std::string TempFile(const std::string& name, const std::string& content) {
  // TEST_TMPDIR (or /tmp/), with a trailing slash.
  std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << content;
  return path;
}

TEST(ConfigTest, ParsesExports) {
  absl::StatusOr<blockmeta::v1::ServerConfig> c = ParseServerConfig(R"pb(
    grpc_listen: "127.0.0.1:0"
    cache { memory_limit_bytes: 1048576 }
    exports { name: "a" nbd_uri: "nbd://localhost/x" connections: 4 }
    exports {
      name: "b"
      image { path: "/img.qcow2" bitmaps: "b1" read_only: true }
    }
    exports {
      name: "c"
      command { argv: [ "nbdkit", "memory", "1G" ] }
    }
  )pb");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->grpc_listen(), "127.0.0.1:0");
  EXPECT_EQ(c->cache().memory_limit_bytes(), 1048576u);
  ASSERT_EQ(c->exports_size(), 3);
  EXPECT_EQ(c->exports(0).nbd_uri(), "nbd://localhost/x");
  EXPECT_EQ(c->exports(0).connections(), 4u);
  EXPECT_EQ(c->exports(1).image().bitmaps(0), "b1");
  EXPECT_EQ(c->exports(2).command().argv_size(), 3);
}

TEST(ConfigTest, UnknownFieldNamesLineAndColumn) {
  absl::StatusOr<blockmeta::v1::ServerConfig> c = ParseServerConfig(
      "grpc_listen: \"x\"\n  exprots { name: \"a\" }\n", "my.textproto");
  ASSERT_THAT(c, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(absl::StartsWith(c.status().message(), "my.textproto:2:"))
      << c.status();
  EXPECT_TRUE(absl::StrContains(c.status().message(), "exprots")) << c.status();
}

TEST(ConfigTest, SyntaxAndTypeErrors) {
  EXPECT_THAT(ParseServerConfig("exports { name: \"a\""),
              StatusIs(absl::StatusCode::kInvalidArgument));
  absl::StatusOr<blockmeta::v1::ServerConfig> c =
      ParseServerConfig("worker_threads: -3\n");
  ASSERT_THAT(c, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(absl::StartsWith(c.status().message(), "config:1:"))
      << c.status();
}

TEST(ConfigTest, LoadsFile) {
  std::string path = TempFile("ok.textproto", "nbd_listen: \"127.0.0.1:0\"\n");
  absl::StatusOr<blockmeta::v1::ServerConfig> c = LoadServerConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->nbd_listen(), "127.0.0.1:0");

  path = TempFile("bad.textproto", "\n\nnbd_listen: 7 7\n");
  c = LoadServerConfig(path);
  ASSERT_THAT(c, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(absl::StrContains(c.status().message(), "bad.textproto:3:"))
      << c.status();
}

TEST(ConfigTest, MissingFile) {
  EXPECT_THAT(LoadServerConfig("/nonexistent/blockmeta.textproto"),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace blockmeta
