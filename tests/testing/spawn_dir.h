// tests/testing/spawn_dir.h — test support: find the Unix socket of the
// NBD server a blockmetad (in this process, or another process) spawned,
// so tests can ask that upstream directly (nbdinfo) and compare.
//
// A spawned server lives in a private directory "blockmeta-XXXXXX" under
// $TMPDIR or /tmp whose "owner" file starts with the spawning process's pid
// (server/upstream/spawned_server.h).
#ifndef BLOCKMETA_TESTS_TESTING_SPAWN_DIR_H_
#define BLOCKMETA_TESTS_TESTING_SPAWN_DIR_H_

#include <sys/types.h>

#include <string>

namespace blockmeta::testing {

// The socket path of a server `owner` spawned ("" if none is found). With
// several, any one of them.
std::string SpawnedServerSocket(pid_t owner);

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_SPAWN_DIR_H_
