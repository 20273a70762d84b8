// client/cli_test.cc — runs the real `blockmeta` binary: --help of every
// command, every bad argument (exit 2 and a clear message), an unreachable
// and a silent server (exit 3 / 4, bounded time), TLS and mutual TLS, and
// each command against an in-process fake server. Output byte-equality with
// qemu-img / nbdinfo is tested against the real server in tests/client.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/fake_blockmeta_server.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::RunOptions;
using ::blockmeta::testing::RunProgram;
using ::blockmeta::testing::RunResult;
using ::testing::EndsWith;
using testing::FakeServer;
using ::testing::HasSubstr;
using ::testing::StartsWith;

RunResult Cli(std::vector<std::string> args, RunOptions o = RunOptions()) {
  args.insert(args.begin(),
              ::blockmeta::testing::RunfilePath("client/blockmeta"));
  o.unset_env.push_back("BLOCKMETA_SERVER");
  if (o.timeout == absl::Seconds(60)) o.timeout = absl::Seconds(30);
  return RunProgram(args, o);
}

// The server's address plus args.
RunResult At(const FakeServer& s, std::vector<std::string> args,
             RunOptions o = RunOptions()) {
  args.push_back("--server=" + s.address());
  return Cli(std::move(args), std::move(o));
}

const std::vector<std::string> kCommands = {
    "list",       "info",  "map",    "changed", "du",
    "invalidate", "stats", "health", "bench",   "help"};

TEST(CliHelp, MainHelp) {
  for (const char* flag : {"--help", "-h"}) {
    RunResult r = Cli({flag});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("Commands:"));
    EXPECT_THAT(r.out, HasSubstr("Exit codes:"));
    for (const std::string& c : kCommands) EXPECT_THAT(r.out, HasSubstr(c));
    EXPECT_EQ(r.err, "");
  }
  RunResult r = Cli({"help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("Commands:"));
}

TEST(CliHelp, EveryCommandHasHelp) {
  for (const std::string& c : kCommands) {
    RunResult r = Cli({c, "--help"});
    EXPECT_EQ(r.exit_code, 0) << c << ": " << r.err;
    EXPECT_THAT(r.out, StartsWith("Usage: blockmeta " + c)) << c;
    EXPECT_THAT(r.out, HasSubstr("--server=ADDR")) << c;
    EXPECT_THAT(r.out, HasSubstr("Exit codes:")) << c;
    RunResult h = Cli({"help", c});
    EXPECT_EQ(h.exit_code, 0);
    EXPECT_EQ(h.out, r.out) << c;
  }
  EXPECT_THAT(Cli({"map", "--help"}).out, HasSubstr("--output=FORMAT"));
  EXPECT_THAT(Cli({"changed", "--help"}).out, HasSubstr("--bitmap=NAME"));
  EXPECT_THAT(Cli({"bench", "--help"}).out, HasSubstr("--concurrency=N"));
}

struct BadCase {
  std::vector<std::string> args;
  std::string message;
};

TEST(CliUsage, EveryBadArgumentExitsTwoWithAMessage) {
  const std::vector<BadCase> cases = {
      {{}, "blockmeta: missing command"},
      {{"frob"}, "blockmeta: unknown command \"frob\""},
      {{"--frob", "list"}, "unknown flag --frob (command flags go after"},
      {{"-x", "list"}, "blockmeta: unknown flag -x"},
      {{"list", "--frob"}, "blockmeta list: unknown flag --frob for 'list'"},
      {{"list", "extra"}, "blockmeta list: unexpected argument \"extra\""},
      {{"list", "--output=yaml"}, "--output: invalid value \"yaml\""},
      {{"info"}, "blockmeta info: missing argument EXPORT"},
      {{"info", "a", "b"}, "unexpected argument \"b\""},
      {{"info", ""}, "empty argument"},
      {{"map"}, "blockmeta map: missing argument EXPORT"},
      {{"map", "d", "--output=yaml"}, "unknown output format \"yaml\""},
      {{"map", "d", "--offset=12q"}, "--offset: invalid size \"12q\""},
      {{"map", "d", "--length=-1"}, "--length: invalid size \"-1\""},
      {{"map", "d", "--length=0"}, "--length must be > 0"},
      {{"map", "d", "--cache=maybe"}, "--cache: invalid value \"maybe\""},
      {{"map", "d", "--batch-size=0"}, "--batch-size: invalid value \"0\""},
      {{"map", "d", "--batch-size=x"}, "--batch-size: invalid value \"x\""},
      {{"map", "d", "--progress=sometimes"}, "--progress: invalid value"},
      {{"map", "d", "--totals", "--output=qemu-json"},
       "--totals cannot be combined with --output=qemu-json"},
      {{"map", "d", "--context=qemu:dirty-bitmap:b", "--output=qemu-json"},
       "--output=qemu-json describes base:allocation only"},
      {{"map", "d", "--context="}, "--context needs a name"},
      {{"map", "d", "--totals=yes"}, "flag --totals takes no value"},
      {{"map", "d", "--offset"}, "flag --offset needs a value"},
      {{"map", "d", "--offset=1", "--offset=2"},
       "flag --offset given more than once"},
      {{"map", "d", "--bitmap=b"}, "unknown flag --bitmap for 'map'"},
      {{"changed", "d"}, "blockmeta changed: missing --bitmap=NAME"},
      {{"changed", "d", "--bitmap="}, "--bitmap needs a name"},
      {{"changed", "d", "--bitmap=b", "--output=qemu-json"},
       "--output=qemu-json describes base:allocation only"},
      {{"changed", "d", "--context=x"}, "unknown flag --context for 'changed'"},
      {{"invalidate", "a", "b"}, "unexpected argument \"b\""},
      {{"invalidate", "--length=0"}, "--length must be > 0"},
      {{"invalidate", "--offset=1z"}, "--offset: invalid size"},
      {{"stats", "--output=csv"}, "--output: invalid value \"csv\""},
      {{"health", "a", "b"}, "unexpected argument \"b\""},
      {{"bench", "--rpc=foo"}, "--rpc: invalid value \"foo\""},
      {{"bench"}, "--rpc=extents needs --export=NAME"},
      {{"bench", "--rpc=compare"}, "--rpc=compare needs --export=NAME"},
      {{"bench", "--export=d", "--concurrency=0"},
       "--concurrency: invalid value \"0\""},
      {{"bench", "--export=d", "--concurrency=2", "--threads=5"},
       "--threads must not exceed --concurrency"},
      {{"bench", "--export=d", "--channels=2"},
       "--channels must not exceed --threads"},
      {{"bench", "--export=d", "--duration=soon"},
       "--duration: invalid timeout \"soon\""},
      {{"bench", "--export=d", "--warmup=-1s"}, "--warmup: invalid timeout"},
      {{"bench", "--export=d", "--pattern=zigzag"},
       "--pattern: invalid value \"zigzag\""},
      {{"bench", "--export=d", "--length=0"}, "--length must be > 0"},
      {{"bench", "--export=d", "--align=0"}, "--align must be > 0"},
      {{"bench", "--export=d", "--rounds=0"}, "--rounds: invalid value"},
      {{"bench", "--export=d", "--max-extents=70000"},
       "--max-extents: invalid value"},
      {{"help", "frob"}, "unknown command \"frob\""},
      {{"--server=nohost", "list"}, "server address \"nohost\" has no port"},
      {{"--server=", "list"}, "--server needs a non-empty value"},
      {{"--server=unix:", "list"}, "has no socket path"},
      {{"--server=h:abc", "list"}, "has an invalid port \"abc\""},
      {{"--timeout=0", "list"}, "--timeout: invalid timeout \"0\""},
      {{"--timeout=abc", "list"}, "--timeout: invalid timeout \"abc\""},
      {{"--tls-cert=c.pem", "list"}, "give both --tls-cert and --tls-key"},
      {{"--tls-ca=/nonexistent/ca.pem", "list"},
       "cannot read TLS CA file \"/nonexistent/ca.pem\""},
  };
  for (const BadCase& c : cases) {
    RunResult r = Cli(c.args);
    std::string line = absl::StrJoin(c.args, " ");
    EXPECT_EQ(r.exit_code, 2) << line << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << line;
    EXPECT_EQ(r.out, "") << line;
    if (!c.args.empty()) {
      EXPECT_THAT(r.err, HasSubstr("--help' for usage")) << line;
    }
  }
}

// A port nothing listens on.
std::string ClosedPort() {
  FakeServer s;
  return s.address();
}

TEST(CliUnreachable, EveryCommandExitsThreeQuickly) {
  const std::string addr = ClosedPort();
  const std::vector<std::vector<std::string>> commands = {
      {"list"},
      {"info", "disk"},
      {"map", "disk"},
      {"changed", "disk", "--bitmap=b1"},
      {"invalidate"},
      {"stats"},
      {"health"},
      {"bench", "--export=disk", "--duration=1s"},
      {"bench", "--rpc=health", "--pattern=random", "--export=disk"},
  };
  for (std::vector<std::string> args : commands) {
    std::string line = absl::StrJoin(args, " ");
    args.push_back("--server=" + addr);
    RunResult r = Cli(args);
    EXPECT_EQ(r.exit_code, 3) << line << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr("UNAVAILABLE")) << line;
    EXPECT_THAT(r.err, HasSubstr("is a blockmeta server running at " + addr))
        << line;
    EXPECT_LT(r.elapsed, absl::Seconds(10)) << line;
  }
}

TEST(CliUnreachable, EnvironmentDefaultServer) {
  const std::string addr = ClosedPort();
  RunOptions o;
  o.env.push_back("BLOCKMETA_SERVER=" + addr);
  std::vector<std::string> args = {
      ::blockmeta::testing::RunfilePath("client/blockmeta"), "list"};
  RunResult r = RunProgram(args, o);
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr(addr));
}

TEST(CliUnreachable, SilentServerHitsTheTimeout) {
  // A socket that listens but never speaks: the kernel completes the TCP
  // handshake, HTTP/2 never starts.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  std::string target = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  RunResult r = Cli({"list", "--server=" + target, "--timeout=500ms"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_THAT(r.err, HasSubstr("ListExports: DEADLINE_EXCEEDED"));
  EXPECT_LT(r.elapsed, absl::Seconds(5));
  close(fd);
}

TEST(CliDeadline, SlowUnaryCallAndStalledMap) {
  FakeServer s;
  s.service().unary_delay_ms = 3000;
  RunResult r = At(s, {"list", "--timeout=300ms"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_EQ(r.err,
            "blockmeta list: ListExports: DEADLINE_EXCEEDED: Deadline "
            "Exceeded\n");
  EXPECT_LT(r.elapsed, absl::Seconds(3));
  // Every stream stalls before its first batch: the map retries, then gives
  // up (a stream that delivers a batch first would reset the attempt count).
  s.service().stall_streams = 100;
  s.service().stall_after = 0;
  s.service().stall_ms = 5000;
  r = At(s, {"map", "disk", "--timeout=300ms", "--output=nbdinfo"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_THAT(r.err, HasSubstr("MapExtents: DEADLINE_EXCEEDED: no extents "
                               "from the server within 300ms (after 5 "
                               "attempts)"));
  EXPECT_LT(r.elapsed, absl::Seconds(8));
}

TEST(CliFake, List) {
  FakeServer s;
  RunResult r = At(s, {"list"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out,
            "NAME  STATE      SIZE  DESCRIPTION\n"
            "disk  READY  16.0 MiB  fake disk\n");
  r = At(s, {"list", "--output=json"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("\"name\": \"disk\""));
  EXPECT_THAT(r.out, HasSubstr("\"state\": \"EXPORT_STATE_READY\""));
}

TEST(CliFake, EnvironmentSelectsTheServer) {
  FakeServer s;
  RunOptions o;
  o.env.push_back("BLOCKMETA_SERVER=" + s.address());
  RunResult r = RunProgram(
      {::blockmeta::testing::RunfilePath("client/blockmeta"), "list"}, o);
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(CliFake, Info) {
  FakeServer s;
  RunResult r = At(s, {"info", "disk"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("size:        16.0 MiB (16777216 bytes)\n"));
  EXPECT_THAT(r.out, HasSubstr("contexts:    base:allocation, "
                               "qemu:dirty-bitmap:b1\n"));
  EXPECT_THAT(r.out, HasSubstr("read-only:   yes\n"));
  r = At(s, {"info", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err,
            "blockmeta info: GetExportInfo: NOT_FOUND: unknown export "
            "\"nope\"\n");
  EXPECT_EQ(r.out, "");
  r = At(s, {"info", "disk", "--output=json"});
  EXPECT_THAT(r.out, HasSubstr("\"size\": \"16777216\""));
}

TEST(CliFake, MapFormats) {
  FakeServer s;
  RunResult r = At(s, {"map", "disk", "--output=nbdinfo", "--length=192k"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out,
            "         0       65536    0  data\n"
            "     65536       65536    3  hole,zero\n"
            "    131072       65536    0  data\n");
  EXPECT_EQ(r.err, "");  // stderr is a pipe: no progress bar.

  r = At(s, {"map", "disk", "--output=csv", "--offset=64k", "--length=64k"});
  EXPECT_EQ(r.out,
            "offset,length,type,description\n65536,65536,3,\"hole,zero\"\n");

  r = At(s, {"map", "disk", "--output=qemu-json", "--offset=15M"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, StartsWith("[{ \"start\": 15728640, \"length\": 65536, "
                                "\"depth\": 0, \"present\": true"));
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 16);

  r = At(s, {"map", "disk", "--output=json", "--length=128k"});
  EXPECT_EQ(r.out,
            "{\"export\": \"disk\", \"context\": \"base:allocation\", "
            "\"offset\": 0, \"end\": 131072, \"export_size\": 16777216, "
            "\"extents\": [\n"
            "{\"offset\": 0, \"length\": 65536, \"type\": 0, \"description\": "
            "\"data\", \"hole\": false, \"zero\": false, \"dirty\": false},\n"
            "{\"offset\": 65536, \"length\": 65536, \"type\": 3, "
            "\"description\": \"hole,zero\", \"hole\": true, \"zero\": true, "
            "\"dirty\": false}\n]}\n");

  r = At(s, {"map", "disk"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("   START       END      LENGTH  TYPE\n"));
  EXPECT_THAT(r.out, HasSubstr("total 16.0 MiB: data 8.0 MiB (50.0%), "
                               "hole,zero 8.0 MiB (50.0%)\n"));

  r = At(s, {"map", "disk", "--totals", "--output=nbdinfo"});
  EXPECT_EQ(r.out,
            "   8388608  50.0%   0 data\n"
            "   8388608  50.0%   3 hole,zero\n");
}

TEST(CliFake, MapErrors) {
  FakeServer s;
  RunResult r = At(s, {"map", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("MapExtents: NOT_FOUND: unknown export"));
  r = At(s, {"map", "disk", "--offset=16M"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("OUT_OF_RANGE"));
  r = At(s, {"map", "disk", "--context=qemu:dirty-bitmap:zz"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("FAILED_PRECONDITION"));
}

TEST(CliFake, MapProgressBarOnlyOnATerminal) {
  FakeServer s;
  RunOptions tty;
  tty.stderr_tty = true;
  RunResult r = At(s, {"map", "disk", "--output=nbdinfo"}, tty);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("] "));
  EXPECT_THAT(r.err, HasSubstr("16.0 MiB"));
  EXPECT_THAT(r.err, HasSubstr("\r\033[K"));  // Erased at the end.
  EXPECT_THAT(r.out, StartsWith("         0       65536    0  data\n"));

  r = At(s, {"map", "disk", "--output=nbdinfo", "--progress=never"}, tty);
  EXPECT_EQ(r.err, "");
  r = At(s, {"map", "disk", "--output=nbdinfo", "--progress=always"});
  EXPECT_THAT(r.err, HasSubstr("16.0 MiB"));
  r = At(s, {"map", "disk", "--output=nbdinfo"});
  EXPECT_EQ(r.err, "");
}

TEST(CliFake, Changed) {
  FakeServer s;
  // The fake's bitmap is dirty in odd MiBs; base:allocation alternates data
  // and hole,zero every 64 KiB, so each dirty MiB is 16 rows.
  RunResult r = At(s, {"changed", "disk", "--bitmap=b1", "--length=4M"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out,
              StartsWith("export disk, context qemu:dirty-bitmap:b1, range "
                         "0-4194304 (4.0 MiB)\n"
                         "  START      END      LENGTH  TYPE   ZERO\n"
                         "1048576  1114112    64.0 KiB  dirty  data\n"
                         "1114112  1179648    64.0 KiB  dirty  zero\n"));
  // The clean MiB between is not listed; the next dirty range starts anew.
  EXPECT_THAT(r.out, HasSubstr("\n2031616  2097152    64.0 KiB  dirty  zero\n"
                               "3145728  3211264    64.0 KiB  dirty  data\n"));
  EXPECT_THAT(r.out, EndsWith("4128768  4194304    64.0 KiB  dirty  zero\n"
                              "2 dirty ranges, 2.0 MiB of 4.0 MiB (50.0%) "
                              "changed, 1.0 MiB of it reads as zeroes\n"));
  // imageio-like JSON: dirty and zero per extent, merged when both agree.
  r = At(s,
         {"changed", "disk", "--bitmap=b1", "--length=1152K", "--output=json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("\"contexts\": [\"qemu:dirty-bitmap:b1\", "
                               "\"base:allocation\"]"));
  EXPECT_THAT(r.out,
              HasSubstr("{\"offset\": 1048576, \"length\": 65536, \"type\": "
                        "1, \"description\": \"dirty\", \"hole\": false, "
                        "\"zero\": false, \"dirty\": true, \"contexts\": "
                        "[{\"type\": 1, \"description\": \"dirty\"}, "
                        "{\"type\": 0, \"description\": \"data\"}]}"));
  EXPECT_THAT(r.out, HasSubstr("{\"offset\": 1114112, \"length\": 65536, "
                               "\"type\": 1, \"description\": \"dirty\", "
                               "\"hole\": true, \"zero\": true, \"dirty\": "
                               "true, \"contexts\": [{\"type\": 1, "
                               "\"description\": \"dirty\"}, {\"type\": 3, "
                               "\"description\": \"hole,zero\"}]}"));
  // nbdinfo stays identical to `nbdinfo --map=qemu:dirty-bitmap:b1`.
  r = At(s, {"changed", "disk", "--bitmap", "b1", "--length=2M",
             "--output=nbdinfo"});
  EXPECT_EQ(r.out,
            "         0     1048576    0  clean\n"
            "   1048576     1048576    1  dirty\n");
  r = At(s, {"changed", "disk", "--bitmap=nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("FAILED_PRECONDITION: context "
                               "\"qemu:dirty-bitmap:nope\" not offered"));
}

TEST(CliFake, MapShowsSeveralContextsSideBySide) {
  FakeServer s;
  RunResult r =
      At(s, {"map", "disk", "--context=base:allocation,qemu:dirty-bitmap:b1",
             "--offset=960K", "--length=192K"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out,
            "export disk, contexts base:allocation + qemu:dirty-bitmap:b1, "
            "range 983040-1179648 (192.0 KiB)\n"
            "  START      END      LENGTH  base:allocation  "
            "qemu:dirty-bitmap:b1\n"
            " 983040  1048576    64.0 KiB  hole,zero        clean\n"
            "1048576  1114112    64.0 KiB  data             dirty\n"
            "1114112  1179648    64.0 KiB  hole,zero        dirty\n"
            "total 192.0 KiB: data 64.0 KiB (33.3%), hole,zero 128.0 KiB "
            "(66.7%)\n");
  r = At(s, {"map", "disk", "--context=base:allocation,qemu:dirty-bitmap:b1",
             "--output=nbdinfo"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--output=human or json"));
  r = At(s, {"map", "disk", "--context=base:allocation,"});
  EXPECT_EQ(r.exit_code, 2);
}

TEST(CliFake, InvalidateStatsHealth) {
  FakeServer s;
  RunResult r = At(s, {"invalidate", "disk", "--offset=1M", "--length=1M"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out,
            "dropped 3 cached extents covering 192.0 KiB (196608 bytes)\n");
  r = At(s, {"invalidate", "--output=json"});
  EXPECT_THAT(r.out, HasSubstr("\"extents_dropped\": \"3\""));
  r = At(s, {"invalidate", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));

  r = At(s, {"stats"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("of 256.0 MiB"));
  EXPECT_THAT(r.out, HasSubstr("disk     base:allocation"));
  EXPECT_THAT(r.out, HasSubstr("disk: upstream calls 2, errors 0"));
  r = At(s, {"stats", "--output=json"});
  EXPECT_THAT(r.out, HasSubstr("\"memory_limit_bytes\": \"268435456\""));
  r = At(s, {"stats", "nope"});
  EXPECT_EQ(r.exit_code, 1);

  r = At(s, {"health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = At(s, {"health", "no.such.Service"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  s.SetServing(false);
  r = At(s, {"health"});
  EXPECT_EQ(r.exit_code, 5);
  EXPECT_EQ(r.out, "NOT_SERVING\n");
}

TEST(CliFake, Bench) {
  FakeServer s;
  RunResult r = At(s, {"bench", "--rpc=health", "--duration=300ms",
                       "--warmup=0", "--concurrency=4"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("Health.Check: concurrency 4"));
  EXPECT_THAT(r.out, HasSubstr("QPS"));
  EXPECT_THAT(r.out, HasSubstr("p999"));
  EXPECT_THAT(r.out, HasSubstr("errors 0"));

  r = At(s, {"bench", "--rpc=compare", "--export=disk", "--rounds=1",
             "--duration=300ms", "--warmup=100ms", "--pattern=random",
             "--length=64k"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("warmed the cache"));
  EXPECT_THAT(r.out, HasSubstr("GetExtents/health = "));
  EXPECT_THAT(r.out, HasSubstr("cache outcomes: HIT"));

  r = At(s, {"bench", "--export=disk", "--duration=300ms", "--warmup=0",
             "--output=json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, StartsWith("{\"rpc\": \"GetExtents\""));

  r = At(s, {"bench", "--export=nope", "--duration=300ms", "--no-warm"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("GetExportInfo: NOT_FOUND"));
  r = At(s, {"bench", "--export=nope", "--duration=300ms"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("warming the cache (MapExtents): NOT_FOUND"));
}

TEST(CliFake, UnixSocket) {
  char tmpl[] = "/tmp/bmcli.XXXXXX";
  std::string dir = mkdtemp(tmpl);
  {
    FakeServer s(dir + "/s.sock");
    RunResult r = Cli({"--server=unix:" + dir + "/s.sock", "health"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  unlink((dir + "/s.sock").c_str());
  rmdir(dir.c_str());
}

// Makes a CA, a server certificate for localhost / 127.0.0.1 and a client
// certificate with openssl.
class Certs {
 public:
  explicit Certs(const std::string& dir) : dir_(dir) {
    Run({"req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", F("ca.key"),
         "-out", F("ca.pem"), "-days", "2", "-subj", "/CN=blockmeta-test-ca"});
    std::ofstream(F("san.cnf"))
        << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    for (const char* who : {"server", "client"}) {
      std::string w = who;
      Run({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-keyout", F(w + ".key"), "-out", F(w + ".csr"), "-subj",
           "/CN=" + w});
      Run({"x509", "-req", "-in", F(w + ".csr"), "-CA", F("ca.pem"), "-CAkey",
           F("ca.key"), "-CAcreateserial", "-out", F(w + ".pem"), "-days", "2",
           "-extfile", F("san.cnf")});
    }
  }
  std::string F(const std::string& name) const { return dir_ + "/" + name; }
  std::string Read(const std::string& name) const {
    std::ifstream in(F(name));
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  void Run(std::vector<std::string> args) {
    args.insert(args.begin(), "/usr/bin/openssl");
    RunResult r = RunProgram(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::string dir_;
};

TEST(CliTls, ServerTlsAndMutualTls) {
  // NOLINTNEXTLINE(concurrency-mt-unsafe): no other thread runs yet.
  Certs certs(std::getenv("TEST_TMPDIR"));
  {
    FakeServer tls("", certs.Read("server.pem"), certs.Read("server.key"));
    RunResult r = At(tls, {"health", "--tls-ca=" + certs.F("ca.pem")});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    // Plaintext client against a TLS server: unavailable.
    r = At(tls, {"health"});
    EXPECT_EQ(r.exit_code, 3) << r.err;
    // Wrong CA (the server's own leaf as CA): handshake fails.
    r = At(tls, {"health", "--tls-ca=" + certs.F("client.pem")});
    EXPECT_EQ(r.exit_code, 3) << r.err;
  }
  {
    FakeServer mtls("", certs.Read("server.pem"), certs.Read("server.key"),
                    certs.Read("ca.pem"));
    RunResult r = At(mtls, {"list", "--tls-ca=" + certs.F("ca.pem"),
                            "--tls-cert=" + certs.F("client.pem"),
                            "--tls-key=" + certs.F("client.key")});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("disk"));
    // No client certificate: refused.
    r = At(mtls, {"list", "--tls-ca=" + certs.F("ca.pem")});
    EXPECT_EQ(r.exit_code, 3) << r.err;
  }
}

}  // namespace
}  // namespace blockmeta::client
