// server/main.cc — blockmetad: flags and configuration, signal handling,
// and the process lifecycle around BlockMetaServer.
//
//   blockmetad --config=/etc/blockmeta/config.textproto
//   blockmetad --grpc_listen=127.0.0.1:0 --export=disk=nbd+unix:///?socket=/s
//
// Flags override the config file. SIGTERM/SIGINT start a graceful shutdown
// (health NOT_SERVING, drain for shutdown_grace_seconds, exit 0); if calls
// stuck in upstream I/O keep it alive 5 s past the grace period, it exits 1.
// SIGHUP re-reads --config and applies its exports (added, removed, changed;
// unchanged ones keep their connections and caches; exports added over the
// Admin API stay unless the file names them). A file that does not parse or
// validate is rejected whole, logged as "config_reload_rejected" with the
// same file:line:column message as at start-up, and nothing changes.
// Start-up failures, including no free pids, threads, descriptors or
// memory, are logged (config_invalid, listen_failed, startup_failed) and
// exit 2; they never abort.
// At start, private directories of spawned servers left by a blockmetad that
// died (SIGKILL) are removed; spawned servers themselves die with us
// (PR_SET_PDEATHSIG, see server/upstream/spawned_server.h).
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "server/blockmeta_server.h"
#include "server/common/config.h"
#include "server/common/log.h"
#include "server/common/startup_resources.h"
#include "server/upstream/spawned_server.h"

ABSL_FLAG(std::string, config, "",
          "Server configuration, a text-format blockmeta.v1.ServerConfig");
ABSL_FLAG(std::string, grpc_listen, "",
          "gRPC listen address host:port (port 0 = pick one); overrides the "
          "config; default 127.0.0.1:50051");
ABSL_FLAG(std::string, grpc_unix_socket, "", "Also serve gRPC on this socket");
ABSL_FLAG(std::string, nbd_listen, "", "NBD shim listen address host:port");
ABSL_FLAG(std::string, nbd_unix_socket, "", "NBD shim Unix socket path");
ABSL_FLAG(std::string, metrics_listen, "",
          "Prometheus metrics address host:port (/metrics)");
ABSL_FLAG(std::string, port_file, "",
          "Write the bound ports here as 'grpc=N nbd=N metrics=N' once "
          "serving (for scripts and tests using port 0)");
ABSL_FLAG(int, shutdown_grace_seconds, 0,
          "Seconds to drain in-flight calls on SIGTERM (default 20)");
ABSL_FLAG(std::string, log_format, "json", "Log format: json or text");
ABSL_FLAG(std::string, log_level, "info",
          "Lowest level logged: debug (every RPC), info, warning, error");
ABSL_FLAG(std::vector<std::string>, export, {},
          "NAME=NBD_URI; repeat the flag for several exports");

namespace {

namespace v1 = ::blockmeta::v1;

// Repeated --export flags: absl keeps only the last, so collect them first.
std::vector<std::string> TakeExportFlags(int* argc, char** argv) {
  std::vector<std::string> out;
  int w = 1;
  for (int r = 1; r < *argc; ++r) {
    absl::string_view a = argv[r];
    if (absl::StartsWith(a, "--export=")) {
      out.emplace_back(a.substr(9));
    } else if ((a == "--export" || a == "-export") && r + 1 < *argc) {
      out.emplace_back(argv[++r]);
    } else {
      argv[w++] = argv[r];
    }
  }
  *argc = w;
  return out;
}

// The exports a reload applies: the file's, plus the --export flags (they
// are part of the start-up set; the file cannot remove them).
absl::Status AddExportFlags(const std::vector<std::string>& export_flags,
                            v1::ServerConfig* config) {
  for (const std::string& spec : export_flags) {
    size_t eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--export wants NAME=NBD_URI, got \"", spec, "\""));
    }
    v1::ExportConfig* e = config->add_exports();
    e->set_name(spec.substr(0, eq));
    e->set_nbd_uri(spec.substr(eq + 1));
  }
  return absl::OkStatus();
}

void ReloadConfig(blockmeta::BlockMetaServer* server,
                  const std::vector<std::string>& export_flags) {
  const std::string path = absl::GetFlag(FLAGS_config);
  blockmeta::LogInfo("config_reload", {{"signal", "SIGHUP"}, {"file", path}});
  v1::ServerConfig file;
  if (!path.empty()) {
    absl::StatusOr<v1::ServerConfig> loaded = blockmeta::LoadServerConfig(path);
    if (!loaded.ok()) {
      blockmeta::LogError(
          "config_reload_rejected",
          {{"code", absl::StatusCodeToString(loaded.status().code())},
           {"error", std::string(loaded.status().message())}});
      return;
    }
    file = *std::move(loaded);
  }
  v1::ServerConfig exports = file;
  absl::Status s = AddExportFlags(export_flags, &exports);
  if (s.ok()) s = server->Reload(exports);
  if (!s.ok()) {
    blockmeta::LogError("config_reload_rejected",
                        {{"code", absl::StatusCodeToString(s.code())},
                         {"error", std::string(s.message())}});
  }
}

int Fail(absl::string_view event, const absl::Status& status) {
  blockmeta::LogError(event, {{"code", absl::StatusCodeToString(status.code())},
                              {"error", std::string(status.message())}});
  return 2;
}

// --help and --helpshort list blockmetad's own flags (absl's default looks
// for a file named after the binary, blockmetad.cc, and finds none);
// --helpfull still lists every library's. --version says how the binary
// was built: absl's default reports the build of the Debian absl library,
// which says "Debug build" even in a --config=opt binary.
void SetUpUsage() {
  absl::FlagsUsageConfig usage;
  auto ours = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_help_flags = ours;
  usage.contains_helpshort_flags = ours;
  usage.version_string = [] {
#ifdef NDEBUG
    return std::string("blockmetad\nrelease build (optimized, NDEBUG)\n");
#else
    return std::string("blockmetad\ndebug build (NDEBUG not defined)\n");
#endif
  };
  absl::SetFlagsUsageConfig(usage);
}

}  // namespace

int main(int argc, char** argv) {
#ifdef NDEBUG
  // Debian's libabsl keeps absl::Mutex's lock-order graph on (about 1% of
  // the shim's CPU in a release profile of nbdcopy through it). Release
  // builds skip it; debug builds, which every test runs, keep the check.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  SetUpUsage();
  absl::SetProgramUsageMessage(
      "gRPC block-metadata service fronting NBD exports.\n"
      "  blockmetad --config=FILE\n"
      "  blockmetad --grpc_listen=HOST:PORT --export=NAME=NBD_URI ...");
  std::vector<std::string> export_flags = TakeExportFlags(&argc, argv);
  absl::ParseCommandLine(argc, argv);

  blockmeta::LogFormat format;
  if (!blockmeta::ParseLogFormat(absl::GetFlag(FLAGS_log_format), &format)) {
    std::fprintf(stderr, "blockmetad: --log_format must be json or text\n");
    return 2;
  }
  blockmeta::SetLogFormat(format);
  blockmeta::LogLevel level;
  if (!blockmeta::ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(stderr,
                 "blockmetad: --log_level must be debug, info, warning or "
                 "error\n");
    return 2;
  }
  blockmeta::SetLogLevel(level);

  v1::ServerConfig config;
  if (!absl::GetFlag(FLAGS_config).empty()) {
    absl::StatusOr<v1::ServerConfig> loaded =
        blockmeta::LoadServerConfig(absl::GetFlag(FLAGS_config));
    if (!loaded.ok()) return Fail("config_invalid", loaded.status());
    config = *std::move(loaded);
  }
  const v1::ServerConfig file_config = config;
  if (absl::Status s = AddExportFlags(export_flags, &config); !s.ok()) {
    return Fail("flag_invalid", s);
  }
  if (!absl::GetFlag(FLAGS_grpc_listen).empty()) {
    config.set_grpc_listen(absl::GetFlag(FLAGS_grpc_listen));
  }
  if (config.grpc_listen().empty() && config.grpc_unix_socket().empty() &&
      absl::GetFlag(FLAGS_grpc_unix_socket).empty()) {
    config.set_grpc_listen("127.0.0.1:50051");
  }
  if (!absl::GetFlag(FLAGS_grpc_unix_socket).empty()) {
    config.set_grpc_unix_socket(absl::GetFlag(FLAGS_grpc_unix_socket));
  }
  if (!absl::GetFlag(FLAGS_nbd_listen).empty()) {
    config.set_nbd_listen(absl::GetFlag(FLAGS_nbd_listen));
  }
  if (!absl::GetFlag(FLAGS_nbd_unix_socket).empty()) {
    config.set_nbd_unix_socket(absl::GetFlag(FLAGS_nbd_unix_socket));
  }
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    config.set_metrics_listen(absl::GetFlag(FLAGS_metrics_listen));
  }
  if (absl::GetFlag(FLAGS_shutdown_grace_seconds) > 0) {
    config.set_shutdown_grace_seconds(
        static_cast<uint32_t>(absl::GetFlag(FLAGS_shutdown_grace_seconds)));
  }

  // Signals are taken synchronously by this thread; block them before any
  // other thread exists so none of them receives one.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  if (int n = blockmeta::CleanStaleSpawnDirs(); n > 0) {
    blockmeta::LogInfo("stale_spawn_dirs_removed", {{"count", n}});
  }

  // Out of pids, threads, descriptors or memory: a message and exit 2, not
  // gRPC's abort (see startup_resources.h).
  {
    v1::ServerConfig sized = config;
    blockmeta::ApplyDefaults(&sized);
    blockmeta::StartupNeeds needs;
    // Our pools, the shim's acceptor and gRPC's own (~14 here) at once.
    needs.threads = static_cast<int>(sized.worker_threads()) + 32;
    if (absl::Status s = blockmeta::CheckStartupResources(needs); !s.ok()) {
      return Fail("startup_failed", s);
    }
  }

  absl::StatusOr<std::unique_ptr<blockmeta::BlockMetaServer>> server =
      absl::InternalError("not created");
  // Creating a thread throws std::system_error when none is left (the
  // check above can pass and another process take the last pid); our
  // constructors join what they started before rethrowing. Memory: the
  // same for std::bad_alloc.
  try {
    server = blockmeta::BlockMetaServer::Create(config);
    if (!server.ok()) return Fail("config_invalid", server.status());
    (*server)->SetStartupFile(file_config);
    if (absl::Status s = (*server)->Start(); !s.ok()) {
      return Fail("listen_failed", s);
    }
  } catch (const std::system_error& e) {
    return Fail("startup_failed",
                absl::ResourceExhaustedError(
                    absl::StrCat("cannot start: ", e.what(),
                                 " (out of threads, pids or descriptors?)")));
  } catch (const std::bad_alloc&) {
    return Fail("startup_failed",
                absl::ResourceExhaustedError("cannot start: out of memory"));
  }
  blockmeta::ApplyDefaults(&config);
  blockmeta::LogInfo("serving",
                     {{"grpc_listen", config.grpc_listen()},
                      {"grpc_port", (*server)->grpc_port()},
                      {"grpc_unix_socket", config.grpc_unix_socket()},
                      {"nbd_port", (*server)->nbd_port()},
                      {"nbd_unix_socket", config.nbd_unix_socket()},
                      {"metrics_port", (*server)->metrics_port()},
                      {"exports", config.exports_size()}});
  if (!absl::GetFlag(FLAGS_port_file).empty()) {
    std::string path = absl::GetFlag(FLAGS_port_file);
    std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp);
      out << "grpc=" << (*server)->grpc_port()
          << " nbd=" << (*server)->nbd_port()
          << " metrics=" << (*server)->metrics_port() << "\n";
    }
    std::rename(tmp.c_str(), path.c_str());  // readers never see half a file
  }

  int sig = 0;
  for (;;) {
    sigwait(&signals, &sig);
    if (sig != SIGHUP) break;
    ReloadConfig(server->get(), export_flags);
  }
  absl::Duration grace = absl::Seconds(config.shutdown_grace_seconds());
  blockmeta::LogInfo("shutting_down",
                     {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"},
                      {"grace_seconds", config.shutdown_grace_seconds()}});
  // In-flight calls are cancelled when the grace period ends, but a worker
  // blocked in an upstream call returns only at that call's own timeout
  // (libnbd cannot cancel a command). Do not outlive the grace period by
  // more than a few seconds waiting for it: orchestrators kill us anyway.
  absl::Notification stopped;
  std::thread watchdog([&stopped, grace] {
    if (!stopped.WaitForNotificationWithTimeout(grace + absl::Seconds(5))) {
      blockmeta::LogError("shutdown_forced",
                          {{"reason",
                            "calls still running after the grace "
                            "period; exiting without them"}});
      std::_Exit(1);
    }
  });
  (*server)->Shutdown(grace);
  server->reset();
  stopped.Notify();
  watchdog.join();
  blockmeta::LogInfo("stopped");
  return 0;
}
