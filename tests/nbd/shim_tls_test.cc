// tests/nbd/shim_tls_test.cc — NBD_OPT_STARTTLS end to end: a qemu-nbd
// upstream behind the shim in `tls: require` mode with client-certificate
// verification, and real TLS clients (nbdinfo, qemu-img with a
// tls-creds-x509 object, nbdcopy) with certificates made by openssl. Also:
// plaintext refused, a wrong CA refused both ways, a client without a
// certificate refused, and a server certificate rotated under the running
// server.
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_test_client.h"

namespace blockmeta {
namespace {

using testing::MergeAdjacent;
using testing::NbdProcess;
using testing::RunCommand;
using testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << data;
}

// A CA and certificates signed by it, made with the openssl CLI (EC keys:
// fast to generate).
class Pki {
 public:
  Pki(const TempDir& dir, const std::string& name) : dir_(dir), name_(name) {}
  absl::Status MakeCa() {
    return Run({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                "/CN=" + name_ + "-ca", "-keyout", Path("ca-key.pem"), "-out",
                Path("ca-cert.pem")});
  }
  // Signs a new key for `cn`; files PREFIX-cert.pem / PREFIX-key.pem.
  absl::Status Issue(const std::string& prefix, const std::string& cn,
                     bool server) {
    const std::string ext = Path(prefix + ".ext");
    WriteFile(ext, server ? "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                            "extendedKeyUsage=serverAuth\n"
                          : "extendedKeyUsage=clientAuth\n");
    absl::Status s = Run({"openssl", "req", "-newkey", "ec", "-pkeyopt",
                          "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
                          "/CN=" + cn, "-keyout", Path(prefix + "-key.pem"),
                          "-out", Path(prefix + ".csr")});
    if (!s.ok()) return s;
    return Run({"openssl", "x509", "-req", "-in", Path(prefix + ".csr"), "-CA",
                Path("ca-cert.pem"), "-CAkey", Path("ca-key.pem"),
                "-CAcreateserial", "-days", "2", "-extfile", ext, "-out",
                Path(prefix + "-cert.pem")});
  }
  // A directory as libnbd's tls-certificates= and qemu's tls-creds-x509
  // dir= expect: ca-cert.pem, client-cert.pem, client-key.pem.
  absl::StatusOr<std::string> ClientDir(bool with_cert = true) {
    const std::string d = Path(with_cert ? "client-dir" : "anon-dir");
    if (absl::Status s = Run({"mkdir", "-p", d}); !s.ok()) return s;
    WriteFile(d + "/ca-cert.pem", ReadFile(Path("ca-cert.pem")));
    if (with_cert) {
      if (absl::Status s = Issue("client", "client-" + name_, false); !s.ok()) {
        return s;
      }
      WriteFile(d + "/client-cert.pem", ReadFile(Path("client-cert.pem")));
      WriteFile(d + "/client-key.pem", ReadFile(Path("client-key.pem")));
    }
    return d;
  }
  std::string Path(const std::string& f) const {
    return dir_.File(name_ + "-" + f);
  }

 private:
  static absl::Status Run(const std::vector<std::string>& argv) {
    return RunCommand(argv).status();
  }
  const TempDir& dir_;
  const std::string name_;
};

class ShimTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<TempDir>();
    ca1_ = std::make_unique<Pki>(*dir_, "one");
    ca2_ = std::make_unique<Pki>(*dir_, "two");
    for (Pki* p : {ca1_.get(), ca2_.get()}) {
      ASSERT_TRUE(p->MakeCa().ok());
      ASSERT_TRUE(p->Issue("server", "localhost", true).ok());
    }
    auto d1 = ca1_->ClientDir();
    ASSERT_TRUE(d1.ok()) << d1.status();
    good_dir_ = *d1;
    auto d2 = ca2_->ClientDir();
    ASSERT_TRUE(d2.ok()) << d2.status();
    wrong_dir_ = *d2;
    auto anon = ca1_->ClientDir(/*with_cert=*/false);
    ASSERT_TRUE(anon.ok());
    anon_dir_ = *anon;
    // The server's files: CA one's, rotated in place by the rotation test.
    cert_ = dir_->File("server-cert.pem");
    key_ = dir_->File("server-key.pem");
    client_ca_ = dir_->File("client-ca.pem");
    WriteFile(cert_, ReadFile(ca1_->Path("server-cert.pem")));
    WriteFile(key_, ReadFile(ca1_->Path("server-key.pem")));
    WriteFile(client_ca_, ReadFile(ca1_->Path("ca-cert.pem")));

    const std::string image = dir_->File("disk.raw");
    ASSERT_TRUE(testing::MakeImage(image, "raw", 8 * kMiB,
                                   {"write -P 1 0 64k", "write -P 2 1M 192k",
                                    "write -z 3M 64k", "write -P 3 5M 4k"})
                    .ok());
    auto proc = NbdProcess::Start({"qemu-nbd", "-f", "raw", "-k", "{sock}",
                                   "--persistent", "--shared=0", image});
    ASSERT_TRUE(proc.ok()) << proc.status();
    proc_ = std::move(*proc);
    blockmeta::v1::ExportConfig config;
    config.set_name("a");
    config.set_nbd_uri(proc_->uri());
    auto up = CreateUpstream(config);
    ASSERT_TRUE(up.ok()) << up.status();
    ASSERT_TRUE((*up)->WaitReady(absl::Now() + absl::Seconds(20)));
    upstream_ = std::move(*up);
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options());
    blockmeta::v1::NbdShimConfig shim;
    shim.mutable_tls()->set_mode("require");
    shim.mutable_tls()->set_cert_file(cert_);
    shim.mutable_tls()->set_key_file(key_);
    shim.mutable_tls()->set_client_ca_file(client_ca_);
    server_ = std::make_unique<NbdServer>(
        std::vector<nbd::ShimExport>{
            {"a", "", upstream_, false, absl::Seconds(30)}},
        cache_.get(), shim);
    sock_ = dir_->File("shim.sock");
    ASSERT_TRUE(server_->Start("", sock_).ok());
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::string TlsUri(const std::string& certs) const {
    return absl::StrCat("nbds+unix:///a?socket=", sock_,
                        "&tls-certificates=", certs);
  }
  static absl::StatusOr<ExtentList> Map(const std::string& uri) {
    auto m = testing::NbdinfoMap(uri);
    if (!m.ok()) return m.status();
    return MergeAdjacent(*m);
  }

  std::unique_ptr<TempDir> dir_;
  std::unique_ptr<Pki> ca1_, ca2_;
  std::string good_dir_, wrong_dir_, anon_dir_;
  std::string cert_, key_, client_ca_;
  std::unique_ptr<NbdProcess> proc_;
  std::shared_ptr<Upstream> upstream_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<NbdServer> server_;
  std::string sock_;
};

TEST_F(ShimTlsTest, RealClientsOverTls) {
  auto want = Map(proc_->uri());
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_GE(want->size(), 4u);
  // nbdinfo --map over nbds+unix.
  auto got = Map(TlsUri(good_dir_));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *want);
  // qemu-img map with a tls-creds-x509 object.
  auto qemu =
      RunCommand({"qemu-img", "map", "--output=json", "--object",
                  "tls-creds-x509,id=tls0,endpoint=client,dir=" + good_dir_,
                  "--image-opts",
                  "driver=nbd,server.type=unix,server.path=" + sock_ +
                      ",export=a,tls-creds=tls0,tls-hostname=localhost"});
  ASSERT_TRUE(qemu.ok()) << qemu.status();
  auto qemu_direct =
      RunCommand({"qemu-img", "map", "--output=json", proc_->uri()});
  ASSERT_TRUE(qemu_direct.ok());
  auto qm = testing::ParseQemuImgMapJson(*qemu);
  auto qd = testing::ParseQemuImgMapJson(*qemu_direct);
  ASSERT_TRUE(qm.ok() && qd.ok());
  EXPECT_EQ(MergeAdjacent(*qm), MergeAdjacent(*qd));
  // nbdcopy: the same bytes.
  const std::string out = dir_->File("copy.raw");
  const std::string direct = dir_->File("direct.raw");
  ASSERT_TRUE(RunCommand({"nbdcopy", TlsUri(good_dir_), out}).ok());
  ASSERT_TRUE(RunCommand({"nbdcopy", proc_->uri(), direct}).ok());
  const std::string a = ReadFile(out), b = ReadFile(direct);
  EXPECT_EQ(a.size(), 8 * kMiB);
  EXPECT_TRUE(a == b);
}

TEST_F(ShimTlsTest, PlaintextIsRefused) {
  // A plaintext nbdinfo fails (every option gets NBD_REP_ERR_TLS_REQD).
  auto plain =
      testing::NbdinfoMap(absl::StrCat("nbd+unix:///a?socket=", sock_));
  EXPECT_FALSE(plain.ok());
  // On the wire.
  auto c = nbd::testing::RawClient::ConnectUnix(sock_);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE((*c)->Read(18).ok());
  ASSERT_TRUE(
      (*c)->Send(nbd::testing::ClientFlags() +
                 nbd::testing::Option(nbd::kOptList) +
                 nbd::testing::Option(nbd::kOptGo, nbd::testing::GoData("a")))
          .ok());
  for (int i = 0; i < 2; ++i) {
    auto r = (*c)->Read(20);
    ASSERT_TRUE(r.ok()) << r.status();
    const auto* p = reinterpret_cast<const uint8_t*>(r->data());
    EXPECT_EQ(nbd::GetBe32(p + 12), nbd::kRepErrTlsReqd);
    auto msg = (*c)->Read(nbd::GetBe32(p + 16));
    ASSERT_TRUE(msg.ok());
  }
}

TEST_F(ShimTlsTest, WrongCaAndMissingClientCertificateAreRefused) {
  // The client does not trust the server's CA, and the server does not
  // trust the client's.
  EXPECT_FALSE(Map(TlsUri(wrong_dir_)).ok());
  // A client without a certificate, although it trusts the server.
  EXPECT_FALSE(Map(TlsUri(anon_dir_)).ok());
  // The server still serves a good client.
  EXPECT_TRUE(Map(TlsUri(good_dir_)).ok());
}

// Rotating the certificate files under the running server: new sessions
// use the new certificate (CA two's) and client CA; no restart.
TEST_F(ShimTlsTest, RotatedCertificateIsUsedWithoutARestart) {
  ASSERT_TRUE(Map(TlsUri(good_dir_)).ok());
  ASSERT_FALSE(Map(TlsUri(wrong_dir_)).ok());
  // Write new files beside, then rename over (how cert-manager and
  // Kubernetes secret volumes rotate: atomically).
  for (const auto& [from, to] :
       std::vector<std::pair<std::string, std::string>>{
           {ca2_->Path("server-key.pem"), key_},
           {ca2_->Path("server-cert.pem"), cert_},
           {ca2_->Path("ca-cert.pem"), client_ca_}}) {
    WriteFile(to + ".new", ReadFile(from));
    ASSERT_EQ(rename((to + ".new").c_str(), to.c_str()), 0);
  }
  EXPECT_TRUE(testing::Eventually(
      [&] { return Map(TlsUri(wrong_dir_)).ok(); },  // CA two's client now
      absl::Seconds(20)));
  EXPECT_FALSE(Map(TlsUri(good_dir_)).ok());  // CA one's no longer
}

}  // namespace
}  // namespace blockmeta
