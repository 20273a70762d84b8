// tests/client/differential_test.cc — `blockmeta map` through a real
// blockmetad must print exactly what the reference tools print when they
// talk to the same NBD upstream directly:
//   blockmeta map --output=qemu-json   ==  qemu-img map --output=json URI
//   blockmeta map --output=nbdinfo     ==  nbdinfo --map URI
//   ... --totals --output=nbdinfo      ==  nbdinfo --map --totals URI
//   blockmeta changed --bitmap=B --output=nbdinfo
//                                      ==  nbdinfo --map=qemu:dirty-bitmap:B
// over several real images (raw and qcow2 under qemu-nbd, nbdkit plugins
// with holes that do not read as zero and an odd size), for a cold cache, a
// warm cache and a bypassed cache.
#include <sys/stat.h>

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

struct Upstream {
  std::string name;
  std::unique_ptr<NbdProcess> process;
  std::vector<std::string> bitmaps;
};

class DifferentialTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    upstreams_ = new std::vector<Upstream>;
    auto add = [](const std::string& name, std::vector<std::string> argv,
                  std::vector<std::string> bitmaps = {}) {
      auto p = NbdProcess::Start(std::move(argv));
      ASSERT_TRUE(p.ok()) << name << ": " << p.status();
      upstreams_->push_back({name, *std::move(p), std::move(bitmaps)});
    };

    // 1. Sparse raw file: data, explicit zeroes, holes.
    std::string raw = dir_->File("sparse.raw");
    ASSERT_TRUE(MakeImage(raw, "raw", 32 << 20,
                          {"write -P 0x11 0 1M", "write -z 4M 1M",
                           "write -P 0x22 9M 64k", "write -P 0x33 31M 1M"})
                    .ok());
    add("raw", {"qemu-nbd", "-t", "-r", "--shared=16", "-k", "{sock}", "-f",
                "raw", raw});

    // 2. qcow2 with zero clusters, a discard and a dirty bitmap "b1" made
    // between two rounds of writes.
    std::string qcow = dir_->File("bitmap.qcow2");
    ASSERT_TRUE(MakeImage(qcow, "qcow2", 64 << 20,
                          {"write -P 1 0 1M", "write -z 4M 1M",
                           "write -P 2 10M 3M", "discard 11M 512k"})
                    .ok());
    ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", qcow, "b1"}).ok());
    ASSERT_TRUE(QemuIo(qcow, "qcow2",
                       {"write -P 3 20M 1M", "write -P 3 33M 64k",
                        "write -z 40M 2M", "write -P 4 63M 1M"})
                    .ok());
    add("qcow",
        {"qemu-nbd", "-t", "-r", "--shared=16", "-k", "{sock}", "-f", "qcow2",
         "-B", "b1", qcow},
        {"b1"});

    // 3. Many small extents (several stream batches).
    std::string many = dir_->File("many.qcow2");
    constexpr int kWrites = 400;
    std::vector<std::string> writes;
    writes.reserve(kWrites);
    for (int i = 0; i < kWrites; ++i) {
      writes.push_back(absl::StrCat("write -P ", i % 200 + 1, " ",
                                    (i * 37 % 1000) * 128, "k 64k"));
    }
    ASSERT_TRUE(MakeImage(many, "qcow2", 128 << 20, writes).ok());
    add("many", {"qemu-nbd", "-t", "-r", "--shared=16", "-k", "{sock}", "-f",
                 "qcow2", many});

    // 4. nbdkit with every base:allocation type, including holes that do not
    // read as zero (qemu-img shows those as not present, without offset).
    std::string script = dir_->File("mixed.sh");
    std::ofstream(script) << "#!/bin/sh\n"
                             "case \"$1\" in\n"
                             "  get_size) echo 8M ;;\n"
                             "  pread) head -c \"$3\" /dev/zero ;;\n"
                             "  can_extents) exit 0 ;;\n"
                             "  extents)\n"
                             "    echo 0 512K hole\n"
                             "    echo 512K 512K zero\n"
                             "    echo 1M 1M\n"
                             "    echo 2M 1M hole,zero\n"
                             "    echo 3M 512K hole\n"
                             "    echo 3584K 512K\n"
                             "    echo 4M 4M hole,zero ;;\n"
                             "  *) exit 2 ;;\n"
                             "esac\n";
    ASSERT_EQ(chmod(script.c_str(), 0755), 0);
    add("mixed", {"nbdkit", "-f", "-U", "{sock}", "sh", script});

    // 5. nbdkit, odd size (not a multiple of 512): qemu adds a zero tail.
    std::string odd = dir_->File("odd.sh");
    std::ofstream(odd) << "#!/bin/sh\n"
                          "case \"$1\" in\n"
                          "  get_size) echo 1000000 ;;\n"
                          "  pread) head -c \"$3\" /dev/zero ;;\n"
                          "  can_extents) exit 0 ;;\n"
                          "  extents) echo 0 4096 hole,zero; "
                          "echo 4096 995904 ;;\n"
                          "  *) exit 2 ;;\n"
                          "esac\n";
    ASSERT_EQ(chmod(odd.c_str(), 0755), 0);
    add("odd", {"nbdkit", "-f", "-U", "{sock}", "sh", odd});

    // 6. nbdkit memory plugin with a few writes (nbdkit's own extents).
    add("memory", {"nbdkit", "-f", "-U", "{sock}", "data",
                   "@0 1 2 3 @1048576 4 5 6 @0x500000 7 8 9", "size=8M"});

    std::vector<std::pair<std::string, std::string>> exports;
    for (const Upstream& u : *upstreams_) {
      exports.emplace_back(u.name, u.process->uri());
    }
    auto server = Blockmetad::Start(exports);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    ASSERT_EQ(server_->AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n").out,
              "SERVING\n")
        << server_->Log();
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete upstreams_;
    upstreams_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr) << "suite set-up failed";
    ASSERT_EQ(upstreams_->size(), 6u) << "suite set-up failed";
  }

  static std::string Tool(const std::vector<std::string>& argv) {
    absl::StatusOr<std::string> out = RunCommand(argv);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : "";
  }

  static std::string Blockmeta(const std::vector<std::string>& args) {
    RunResult r = server_->Cli(args);
    EXPECT_EQ(r.exit_code, 0) << absl::StrJoin(args, " ") << "\n"
                              << r.err << "\nserver log:\n"
                              << server_->Log();
    return r.out;
  }

  static TempDir* dir_;
  static std::vector<Upstream>* upstreams_;
  static Blockmetad* server_;
};

TempDir* DifferentialTest::dir_ = nullptr;
std::vector<Upstream>* DifferentialTest::upstreams_ = nullptr;
Blockmetad* DifferentialTest::server_ = nullptr;

TEST_F(DifferentialTest, QemuJsonEqualsQemuImgMap) {
  for (const Upstream& u : *upstreams_) {
    std::string want =
        Tool({"qemu-img", "map", "--output=json", u.process->uri()});
    ASSERT_FALSE(want.empty()) << u.name;
    for (const char* cache :
         {"--cache=refresh", "--cache=use", "--cache=bypass"}) {
      EXPECT_EQ(Blockmeta({"map", u.name, "--output=qemu-json", cache}), want)
          << u.name << " " << cache;
    }
  }
}

TEST_F(DifferentialTest, NbdinfoEqualsNbdinfoMap) {
  for (const Upstream& u : *upstreams_) {
    std::string want = Tool({"nbdinfo", "--map", u.process->uri()});
    ASSERT_FALSE(want.empty()) << u.name;
    for (const char* cache :
         {"--cache=refresh", "--cache=use", "--cache=bypass"}) {
      EXPECT_EQ(Blockmeta({"map", u.name, "--output=nbdinfo", cache}), want)
          << u.name << " " << cache;
    }
    // Small batches: many stream messages, same answer.
    EXPECT_EQ(Blockmeta({"map", u.name, "--output=nbdinfo", "--batch-size=1"}),
              want)
        << u.name;
    EXPECT_EQ(Blockmeta({"map", u.name, "--output=nbdinfo", "--totals"}),
              Tool({"nbdinfo", "--map", "--totals", u.process->uri()}))
        << u.name;
  }
}

TEST_F(DifferentialTest, ChangedEqualsNbdinfoDirtyBitmap) {
  int checked = 0;
  for (const Upstream& u : *upstreams_) {
    for (const std::string& b : u.bitmaps) {
      std::string ctx = "qemu:dirty-bitmap:" + b;
      std::string want = Tool({"nbdinfo", "--map=" + ctx, u.process->uri()});
      ASSERT_THAT(want, ::testing::HasSubstr("dirty")) << u.name;
      EXPECT_EQ(
          Blockmeta({"changed", u.name, "--bitmap=" + b, "--output=nbdinfo"}),
          want)
          << u.name;
      EXPECT_EQ(Blockmeta({"map", u.name, "--context=" + ctx,
                           "--output=nbdinfo", "--cache=bypass"}),
                want)
          << u.name;
      EXPECT_EQ(Blockmeta({"changed", u.name, "--bitmap=" + b,
                           "--output=nbdinfo", "--totals"}),
                Tool({"nbdinfo", "--map=" + ctx, "--totals", u.process->uri()}))
          << u.name;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 1);
}

// An empty (0-byte) export: every format says "nothing" exactly as the
// reference tools do (qemu-img prints one zero-length absent entry).
TEST(DifferentialEmptyTest, EmptyExportMatchesTheTools) {
  auto up = NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "null", "0"});
  ASSERT_TRUE(up.ok()) << up.status();
  auto server = Blockmetad::Start({{"empty", (*up)->uri()}});
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_EQ((*server)->AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n").out,
            "SERVING\n")
      << (*server)->Log();
  auto tool = [](const std::vector<std::string>& argv) {
    absl::StatusOr<std::string> out = RunCommand(argv);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : "<failed>";
  };
  auto cli = [&](const std::vector<std::string>& args) {
    RunResult r = (*server)->Cli(args);
    EXPECT_EQ(r.exit_code, 0) << absl::StrJoin(args, " ") << "\n" << r.err;
    return r.out;
  };
  EXPECT_EQ(cli({"map", "empty", "--output=qemu-json"}),
            tool({"qemu-img", "map", "--output=json", (*up)->uri()}));
  EXPECT_EQ(cli({"map", "empty", "--output=nbdinfo"}),
            tool({"nbdinfo", "--map", (*up)->uri()}));
  EXPECT_EQ(cli({"map", "empty", "--output=json"}),
            "{\"export\": \"empty\", \"context\": \"base:allocation\", "
            "\"offset\": 0, \"end\": 0, \"export_size\": 0, \"extents\": "
            "[]}\n");
}

}  // namespace
}  // namespace blockmeta::testing
