// client/export_commands_test.cc — flags of `blockmeta export add` to an
// ExportConfig, and the usage errors.
#include "client/export_commands.h"

#include <sstream>

#include "gtest/gtest.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;

TEST(ExportCommandsTest, OneUpstreamKindEach) {
  v1::ExportConfig c;
  EXPECT_EQ(ExportConfigFromFlags("j", {{"uri", "nbd://h/x"}}, &c),
            std::nullopt);
  EXPECT_EQ(c.name(), "j");
  EXPECT_EQ(c.nbd_uri(), "nbd://h/x");

  v1::ExportConfig img;
  EXPECT_EQ(ExportConfigFromFlags("i",
                                  {{"image", "/vm/d.qcow2"},
                                   {"bitmap", "b1,b2"},
                                   {"read-only", ""},
                                   {"connections", "4"}},
                                  &img),
            std::nullopt);
  EXPECT_EQ(img.image().path(), "/vm/d.qcow2");
  ASSERT_EQ(img.image().bitmaps_size(), 2);
  EXPECT_EQ(img.image().bitmaps(1), "b2");
  EXPECT_TRUE(img.read_only());
  EXPECT_EQ(img.connections(), 4u);

  v1::ExportConfig cmd;
  EXPECT_EQ(
      ExportConfigFromFlags("m", {{"command", "nbdkit  memory 1G"}}, &cmd),
      std::nullopt);
  ASSERT_EQ(cmd.command().argv_size(), 3);
  EXPECT_EQ(cmd.command().argv(2), "1G");
}

TEST(ExportCommandsTest, UsageErrors) {
  v1::ExportConfig c;
  EXPECT_NE(ExportConfigFromFlags("x", {}, &c), std::nullopt);
  EXPECT_NE(ExportConfigFromFlags("x", {{"uri", "a"}, {"image", "b"}}, &c),
            std::nullopt);
  EXPECT_NE(ExportConfigFromFlags("x", {{"uri", "a"}, {"bitmap", "b"}}, &c),
            std::nullopt);
  EXPECT_NE(
      ExportConfigFromFlags("x", {{"uri", "a"}, {"connections", "many"}}, &c),
      std::nullopt);
}

TEST(ExportCommandsTest, PrintsOneLine) {
  v1::AdminExport e;
  e.mutable_config()->set_name("job");
  e.set_state(v1::EXPORT_STATE_READY);
  e.set_origin(v1::EXPORT_ORIGIN_API);
  e.set_generation(7);
  std::ostringstream o;
  PrintAdminExport(o, e);
  EXPECT_EQ(o.str(), "job READY api generation=7\n");
}

}  // namespace
}  // namespace blockmeta::client
