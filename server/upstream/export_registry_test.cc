// server/upstream/export_registry_test.cc — config validation (one
// INVALID_ARGUMENT per mistake, naming export and field) and a registry
// of real upstreams.
#include "server/upstream/export_registry.h"

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta {
namespace {

using blockmeta::v1::ExportConfig;
using blockmeta::v1::ServerConfig;

ExportConfig Uri(const std::string& name, const std::string& uri) {
  ExportConfig e;
  e.set_name(name);
  e.set_nbd_uri(uri);
  return e;
}

void ExpectInvalid(const ExportConfig& e, const std::string& field) {
  absl::Status s = ValidateExportConfig(e);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "export \"" + e.name() + "\""))
      << s;
  EXPECT_TRUE(absl::StrContains(s.message(), field + ":")) << s;
}

TEST(ValidateTest, Names) {
  EXPECT_TRUE(ValidateExportConfig(Uri("a", "nbd://h/x")).ok());
  ExpectInvalid(Uri("", "nbd://h/x"), "name");
  ExpectInvalid(Uri(std::string(257, 'n'), "nbd://h/x"), "name");
  EXPECT_TRUE(
      ValidateExportConfig(Uri(std::string(256, 'n'), "nbd://h/x")).ok());
  ExpectInvalid(Uri("tab\there", "nbd://h/x"), "name");
}

TEST(ValidateTest, Upstreams) {
  ExportConfig none;
  none.set_name("n");
  ExpectInvalid(none, "upstream");
  ExpectInvalid(Uri("u", "http://h/x"), "nbd_uri");
  EXPECT_TRUE(ValidateExportConfig(Uri("u", "nbd+unix:///?socket=/s")).ok());
  EXPECT_TRUE(ValidateExportConfig(Uri("u", "nbds://h:10809/x")).ok());

  blockmeta::testing::TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_TRUE(blockmeta::testing::MakeImage(img, "qcow2", 1 << 20).ok());
  ExportConfig image;
  image.set_name("i");
  image.mutable_image()->set_path(img);
  image.mutable_image()->add_bitmaps("b1");
  EXPECT_TRUE(ValidateExportConfig(image).ok());
  image.mutable_image()->set_format("vmdk");
  ExpectInvalid(image, "image.format");
  image.mutable_image()->set_format("raw");
  ExpectInvalid(image, "image.bitmaps");  // bitmaps need qcow2
  image.mutable_image()->set_path(dir.File("missing.raw"));
  ExpectInvalid(image, "image.path");
  image.mutable_image()->set_path(dir.path());
  ExpectInvalid(image, "image.path");  // a directory

  ExportConfig cmd;
  cmd.set_name("c");
  cmd.mutable_command();
  ExpectInvalid(cmd, "command.argv");
  cmd.mutable_command()->add_argv("nbdkit");
  EXPECT_TRUE(ValidateExportConfig(cmd).ok());
}

TEST(ValidateTest, Numbers) {
  ExportConfig e = Uri("x", "nbd://h/x");
  e.set_connections(17);
  ExpectInvalid(e, "connections");
  e.set_connections(16);
  e.set_upstream_timeout_ms(3600 * 1000 + 1);
  ExpectInvalid(e, "upstream_timeout_ms");
}

TEST(RegistryTest, DuplicateNamesRejected) {
  ServerConfig c;
  *c.add_exports() = Uri("a", "nbd://h/x");
  *c.add_exports() = Uri("a", "nbd://h/y");
  auto r = ExportRegistry::Create(c);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "duplicate"))
      << r.status();
}

TEST(RegistryTest, CreatesUpstreamsSortedByName) {
  auto server = blockmeta::testing::NbdProcess::Start(
      {"nbdkit", "-U", "{sock}", "-f", "memory", "1M"});
  ASSERT_TRUE(server.ok()) << server.status();
  ServerConfig c;
  *c.add_exports() = Uri("zeta", (*server)->uri());
  ExportConfig* cmd = c.add_exports();
  cmd->set_name("alpha");
  for (const char* a : {"nbdkit", "memory", "2M"}) {
    cmd->mutable_command()->add_argv(a);
  }
  auto r = ExportRegistry::Create(c);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<ExportEntry*> all = (*r)->All();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0]->config.name(), "alpha");
  EXPECT_EQ(all[1]->config.name(), "zeta");
  EXPECT_EQ((*r)->Find("nope"), nullptr);
  ExportEntry* z = (*r)->Find("zeta");
  ASSERT_NE(z, nullptr);
  ASSERT_TRUE(z->upstream->WaitReady(absl::Now() + absl::Seconds(20)))
      << z->upstream->LastError();
  EXPECT_EQ(z->upstream->Info()->size, 1u << 20);
  ExportEntry* a = (*r)->Find("alpha");
  ASSERT_TRUE(a->upstream->WaitReady(absl::Now() + absl::Seconds(20)))
      << a->upstream->LastError();
  EXPECT_EQ(a->upstream->Info()->size, 2u << 20);
}

}  // namespace
}  // namespace blockmeta
