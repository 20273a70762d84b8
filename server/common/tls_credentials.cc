// server/common/tls_credentials.cc — see tls_credentials.h.
#include "server/common/tls_credentials.h"

#include <sys/stat.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/log.h"

namespace blockmeta {
namespace {

std::string StampOf(const std::string& path) {
  if (path.empty()) return "-";
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return "missing";
  return absl::StrCat(st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                      st.st_mtim.tv_nsec);
}

}  // namespace

std::string TlsCredentials::Stamps() const {
  return absl::StrCat(StampOf(files_.cert_file), "|", StampOf(files_.key_file),
                      "|", StampOf(files_.ca_file));
}

absl::StatusOr<TlsCredentials::Credentials> TlsCredentials::Load(
    const TlsFiles& files) {
  if (files.cert_file.empty() || files.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs a certificate and a key file");
  }
  gnutls_certificate_credentials_t raw = nullptr;
  if (int rc = gnutls_certificate_allocate_credentials(&raw); rc < 0) {
    return absl::InternalError(gnutls_strerror(rc));
  }
  Credentials creds(raw, gnutls_certificate_free_credentials);
  int rc = gnutls_certificate_set_x509_key_file(raw, files.cert_file.c_str(),
                                                files.key_file.c_str(),
                                                GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TLS certificate ", files.cert_file.substr(0, 256), " / key ",
        files.key_file.substr(0, 256), ": ", gnutls_strerror(rc)));
  }
  if (!files.ca_file.empty()) {
    rc = gnutls_certificate_set_x509_trust_file(raw, files.ca_file.c_str(),
                                                GNUTLS_X509_FMT_PEM);
    if (rc <= 0) {  // 0 certificates is as bad as an error
      return absl::InvalidArgumentError(
          absl::StrCat("TLS client CA ", files.ca_file.substr(0, 256), ": ",
                       rc == 0 ? "no certificates" : gnutls_strerror(rc)));
    }
  }
  return creds;
}

absl::StatusOr<std::unique_ptr<TlsCredentials>> TlsCredentials::Create(
    TlsFiles files, absl::Duration recheck) {
  std::unique_ptr<TlsCredentials> t(
      new TlsCredentials(std::move(files), recheck));
  const std::string stamps = t->Stamps();
  absl::StatusOr<Credentials> c = Load(t->files_);
  if (!c.ok()) return c.status();
  sync::MutexLock lock(&t->mu_);
  t->current_ = *std::move(c);
  t->stamps_ = stamps;
  t->checked_ = absl::Now();
  t->loads_ = 1;
  return t;
}

TlsCredentials::Credentials TlsCredentials::Get() {
  sync::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  if (now - checked_ < recheck_) return current_;
  checked_ = now;
  const std::string stamps = Stamps();
  if (stamps == stamps_) return current_;
  stamps_ = stamps;  // retried only after the next change
  absl::StatusOr<Credentials> c = Load(files_);
  if (!c.ok()) {
    LogWarning("tls_reload_failed", {{"error", c.status().ToString()}});
    return current_;
  }
  current_ = *std::move(c);
  ++loads_;
  LogInfo("tls_reloaded", {{"cert_file", files_.cert_file.substr(0, 256)}});
  return current_;
}

int TlsCredentials::loads() const {
  sync::MutexLock lock(&mu_);
  return loads_;
}

}  // namespace blockmeta
