// server/nbd/handshake_fuzz_main.cc — runs the fuzz target as a plain test:
// every file of the seed corpus (the directory in argv[1] or
// $FUZZ_CORPUS_DIR), then deterministic mutations of each seed (byte
// flips, truncations at every offset up to 512, splices), so the cc_test
// exercises the same code as a short libFuzzer run without clang.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void Run(const std::string& s) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "";
  if (dir.empty()) {
    // main has started no thread yet, so nothing can race this read.
    const char* env =
        std::getenv("FUZZ_CORPUS_DIR");  // NOLINT(concurrency-mt-unsafe)
    if (env != nullptr) dir = env;
  }
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) {
    std::cerr << "cannot open corpus directory '" << dir
              << "': " << ec.message() << "\n";
    return 1;
  }
  std::vector<std::string> seeds;
  for (const std::filesystem::directory_entry& e : it) {
    if (e.path().filename().string()[0] == '.') continue;
    std::ifstream f(e.path(), std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    seeds.push_back(ss.str());
  }
  if (seeds.size() < 5) {
    std::cerr << "expected the seed corpus, found " << seeds.size() << "\n";
    return 1;
  }
  std::mt19937_64 rng(42);
  size_t runs = 0;
  for (const std::string& s : seeds) {
    Run(s);
    ++runs;
    for (size_t cut = 0; cut < s.size() && cut < 512; ++cut) {
      Run(s.substr(0, cut));
      ++runs;
    }
    for (int i = 0; i < 300; ++i) {
      std::string m = s;
      const int edits = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < edits && !m.empty(); ++k) {
        size_t pos = rng() % m.size();
        switch (rng() % 4) {
          case 0:
            m[pos] = static_cast<char>(rng());
            break;
          case 1:
            m[pos] ^= static_cast<char>(1u << (rng() % 8));
            break;
          case 2:
            m.erase(pos, 1 + rng() % 8);
            break;
          default:
            m.insert(pos, seeds[rng() % seeds.size()].substr(0, 64));
        }
      }
      Run(m);
      ++runs;
    }
  }
  std::cout << "ran " << runs << " inputs from " << seeds.size() << " seeds\n";
  return 0;
}
