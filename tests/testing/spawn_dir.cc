// tests/testing/spawn_dir.cc — see spawn_dir.h.
#include "tests/testing/spawn_dir.h"

#include <dirent.h>

#include <cstdlib>
#include <fstream>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace blockmeta::testing {

std::string SpawnedServerSocket(pid_t owner) {
  std::vector<std::string> bases = {"/tmp"};
  // NOLINTNEXTLINE(concurrency-mt-unsafe): tests do not setenv meanwhile.
  if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0') {
    bases.insert(bases.begin(), t);
  }
  const std::string prefix = absl::StrCat(owner, " ");
  for (const std::string& base : bases) {
    DIR* d = opendir(base.c_str());
    if (d == nullptr) continue;
    std::string found;
    // NOLINTNEXTLINE(concurrency-mt-unsafe): a DIR of our own.
    while (dirent* ent = readdir(d)) {
      const std::string name = ent->d_name;
      if (!absl::StartsWith(name, "blockmeta-")) continue;
      std::ifstream stamp(absl::StrCat(base, "/", name, "/owner"));
      std::string line;
      if (std::getline(stamp, line) && absl::StartsWith(line, prefix)) {
        found = absl::StrCat(base, "/", name, "/nbd.sock");
        break;
      }
    }
    closedir(d);
    if (!found.empty()) return found;
  }
  return "";
}

}  // namespace blockmeta::testing
