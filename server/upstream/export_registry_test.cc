// server/upstream/export_registry_test.cc — config validation (one
// INVALID_ARGUMENT per mistake, naming export and field) and a registry
// of real upstreams.
#include "server/upstream/export_registry.h"

#include "absl/strings/match.h"
#include "common/quote.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

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
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument)) << s;
  // Names the export, as every message quotes a caller's string (bounded).
  EXPECT_TRUE(
      absl::StrContains(s.message(), "export " + QuoteBounded(e.name())))
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

TEST(ValidateTest, ImmutableAndContentId) {
  ExportConfig e = Uri("x", "nbd://h/x");
  e.set_content_id("disk@1");
  ExpectInvalid(e, "content_id");  // only with immutable
  e.set_immutable(true);
  EXPECT_TRUE(ValidateExportConfig(e).ok());
  e.set_content_id(std::string(257, 'c'));
  ExpectInvalid(e, "content_id");
  e.set_content_id("bad\n");
  ExpectInvalid(e, "content_id");
  e.set_content_id("disk@1");
  e.set_cache_ttl_seconds(60);  // immutable extents never expire
  ExpectInvalid(e, "cache_ttl_seconds");
}

TEST(RegistryTest, DuplicateNamesRejected) {
  ServerConfig c;
  *c.add_exports() = Uri("a", "nbd://h/x");
  *c.add_exports() = Uri("a", "nbd://h/y");
  auto r = ExportRegistry::Create(c);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument));
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
  std::vector<ExportRef> all = (*r)->All();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0]->config.name(), "alpha");
  EXPECT_EQ(all[1]->config.name(), "zeta");
  EXPECT_EQ((*r)->Find("nope"), nullptr);
  ExportRef z = (*r)->Find("zeta");
  ASSERT_NE(z, nullptr);
  ASSERT_TRUE(z->upstream->WaitReady(absl::Now() + absl::Seconds(20)))
      << z->upstream->LastError();
  EXPECT_EQ(z->upstream->Info()->size, 1u << 20);
  ExportRef a = (*r)->Find("alpha");
  ASSERT_TRUE(a->upstream->WaitReady(absl::Now() + absl::Seconds(20)))
      << a->upstream->LastError();
  EXPECT_EQ(a->upstream->Info()->size, 2u << 20);
}

// A registry whose upstreams are fakes; counts upstreams destroyed.
struct FakeRegistry {
  std::shared_ptr<std::atomic<int>> destroyed =
      std::make_shared<std::atomic<int>>(0);
  std::vector<std::string> events;  // "added:x", "removed:x", "drained:x"
  sync::Mutex mu;
  std::unique_ptr<ExportRegistry> registry;

  FakeRegistry() {
    auto destroyed_count = destroyed;
    registry = std::make_unique<ExportRegistry>(
        [destroyed_count](
            const ExportConfig&) -> absl::StatusOr<std::unique_ptr<Upstream>> {
          class Counted : public FakeUpstream {
           public:
            explicit Counted(std::shared_ptr<std::atomic<int>> n)
                : FakeUpstream(1 << 20, 512, false), n_(std::move(n)) {}
            ~Counted() override { n_->fetch_add(1); }

           private:
            std::shared_ptr<std::atomic<int>> n_;
          };
          return std::make_unique<Counted>(destroyed_count);
        });
    ExportRegistry::Hooks hooks;
    hooks.added = [this](const ExportRef& e) { Note("added:", e); };
    hooks.updated = [this](const ExportRef& e) { Note("updated:", e); };
    hooks.removed = [this](const ExportRef& e) { Note("removed:", e); };
    hooks.drained = [this](const std::string& n, uint64_t) {
      sync::MutexLock lock(&mu);
      events.push_back("drained:" + n);
    };
    registry->SetHooks(std::move(hooks));
  }
  void Note(const char* what, const ExportRef& e) {
    sync::MutexLock lock(&mu);
    events.push_back(what + e->config.name());
  }
  std::vector<std::string> Events() {
    sync::MutexLock lock(&mu);
    return events;
  }
};

TEST(RegistryRuntimeTest, AddIsIdempotentAndConflictsAreAlreadyExists) {
  FakeRegistry f;
  auto a = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->created);
  auto again = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created);
  EXPECT_EQ(again->entry, a->entry);
  auto other = f.registry->Add(Uri("a", "nbd://h/y"), ExportOrigin::kApi);
  EXPECT_THAT(other, StatusIs(absl::StatusCode::kAlreadyExists));
  auto bad = f.registry->Add(Uri("b", "http://h/y"), ExportOrigin::kApi);
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(f.registry->size(), 1u);
}

TEST(RegistryRuntimeTest, RemovalDrainsWithTheLastReference) {
  FakeRegistry f;
  auto a = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  ASSERT_TRUE(a.ok());
  const uint64_t gen1 = a->entry->generation;
  ExportRef held = f.registry->Find("a");  // a call in flight
  a->entry.reset();
  auto removed = f.registry->Remove("a");
  ASSERT_TRUE(removed.ok());
  removed->reset();
  EXPECT_EQ(f.registry->Find("a"), nullptr);
  EXPECT_TRUE(held->removed());
  EXPECT_TRUE(f.registry->Draining("a"));
  // While the old generation is referenced the name cannot come back.
  auto early = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  EXPECT_THAT(early, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_FALSE(f.registry->WaitDrained("a", absl::Now()));
  EXPECT_EQ(f.destroyed->load(), 0);
  held.reset();  // the call ends: the upstream goes
  ASSERT_TRUE(f.registry->WaitDrained("a", absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(f.destroyed->load(), 1);
  auto re = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  ASSERT_TRUE(re.ok()) << re.status();
  EXPECT_GT(re->entry->generation, gen1);
  EXPECT_FALSE(re->entry->removed());
  EXPECT_EQ(f.Events(), (std::vector<std::string>{"added:a", "removed:a",
                                                  "drained:a", "added:a"}));
  EXPECT_THAT(f.registry->Remove("nope"),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(RegistryRuntimeTest, UpdateCannotChangeImmutableOrContentId) {
  FakeRegistry f;
  ExportConfig c = Uri("a", "nbd://h/x");
  c.set_immutable(true);
  c.set_content_id("one");
  ASSERT_TRUE(f.registry->Add(c, ExportOrigin::kApi).ok());
  ExportConfig d = c;
  d.set_content_id("two");
  EXPECT_THAT(f.registry->Update(d),
              StatusIs(absl::StatusCode::kInvalidArgument));
  d = c;
  d.set_immutable(false);
  d.clear_content_id();
  EXPECT_THAT(f.registry->Update(d),
              StatusIs(absl::StatusCode::kInvalidArgument));
  d = c;
  d.set_cache_ttl_seconds(5);
  EXPECT_THAT(f.registry->Update(d),
              StatusIs(absl::StatusCode::kInvalidArgument));
  d = c;
  d.set_description("snapshot of vm1");
  EXPECT_TRUE(f.registry->Update(d).ok());
}

TEST(RegistryRuntimeTest, UpdateChangesOnlyMutableFieldsAndKeepsUpstream) {
  FakeRegistry f;
  auto a = f.registry->Add(Uri("a", "nbd://h/x"), ExportOrigin::kApi);
  ASSERT_TRUE(a.ok());
  ExportConfig c = Uri("a", "nbd://h/x");
  c.set_description("backup job 7");
  c.set_read_only(true);
  c.set_cache_ttl_seconds(5);
  auto u = f.registry->Update(c);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ((*u)->upstream, a->entry->upstream);
  EXPECT_EQ((*u)->generation, a->entry->generation);
  EXPECT_EQ(f.registry->Find("a")->config.description(), "backup job 7");
  EXPECT_EQ(a->entry->config.description(), "");  // old version unchanged
  c.set_nbd_uri("nbd://h/other");
  EXPECT_THAT(f.registry->Update(c),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f.registry->Update(Uri("zz", "nbd://h/x")),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(f.destroyed->load(), 0);
}

TEST(RegistryRuntimeTest, ApplyFileDiffsAndKeepsApiExports) {
  FakeRegistry f;
  ServerConfig file;
  *file.add_exports() = Uri("keep", "nbd://h/k");
  *file.add_exports() = Uri("change", "nbd://h/c");
  *file.add_exports() = Uri("replace", "nbd://h/r");
  *file.add_exports() = Uri("drop", "nbd://h/d");
  auto r0 = f.registry->ApplyFile(file, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(r0.ok()) << r0.status();
  EXPECT_EQ(r0->added.size(), 4u);
  ASSERT_TRUE(
      f.registry->Add(Uri("api", "nbd://h/a"), ExportOrigin::kApi).ok());
  ExportRef keep = f.registry->Find("keep");
  ExportRef change = f.registry->Find("change");

  ServerConfig next;
  *next.add_exports() = Uri("keep", "nbd://h/k");
  ExportConfig changed = Uri("change", "nbd://h/c");
  changed.set_description("new text");
  *next.add_exports() = changed;
  *next.add_exports() = Uri("replace", "nbd://h/r2");
  *next.add_exports() = Uri("new", "nbd://h/n");
  auto r1 = f.registry->ApplyFile(next, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->added, std::vector<std::string>{"new"});
  EXPECT_EQ(r1->removed, std::vector<std::string>{"drop"});
  EXPECT_EQ(r1->updated, std::vector<std::string>{"change"});
  EXPECT_EQ(r1->replaced, std::vector<std::string>{"replace"});
  EXPECT_EQ(r1->unchanged, 1u);
  EXPECT_EQ(f.registry->Find("keep"), keep);  // untouched: same entry
  EXPECT_EQ(f.registry->Find("change")->upstream, change->upstream);
  EXPECT_EQ(f.registry->Find("replace")->config.nbd_uri(), "nbd://h/r2");
  ASSERT_NE(f.registry->Find("api"), nullptr);  // API exports stay
  EXPECT_EQ(f.registry->Find("api")->origin, ExportOrigin::kApi);
  EXPECT_EQ(f.registry->Find("drop"), nullptr);

  // A bad file changes nothing.
  ServerConfig bad = next;
  *bad.add_exports() = Uri("broken", "http://nope");
  auto r2 = f.registry->ApplyFile(bad, absl::Now() + absl::Seconds(10));
  EXPECT_THAT(r2, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(f.registry->size(), 5u);
  EXPECT_EQ(f.registry->Find("broken"), nullptr);

  // The file naming an API export takes it over.
  *next.add_exports() = Uri("api", "nbd://h/a");
  auto r3 = f.registry->ApplyFile(next, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(f.registry->Find("api")->origin, ExportOrigin::kFile);
}

}  // namespace
}  // namespace blockmeta
