// server/service/export_health.cc — see export_health.h.
#include "server/service/export_health.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace blockmeta {

std::string ExportHealthServiceName(const std::string& export_name) {
  return absl::StrCat(kBlockMetaHealthService, "/", export_name);
}

ExportHealth::ExportHealth(const ExportRegistry* registry)
    : registry_(registry) {}

void ExportHealth::CountCurrentExports() {
  std::vector<ExportRef> all = registry_->All();
  sync::MutexLock lock(&mu_);
  for (const ExportRef& e : all) counted_.insert(e->generation);
}

void ExportHealth::Forget(uint64_t generation) {
  sync::MutexLock lock(&mu_);
  counted_.erase(generation);
}

HealthStatus ExportHealth::Status(const std::string& service) {
  auto of = [](bool ready) {
    return ready ? HealthStatus::kServing : HealthStatus::kNotServing;
  };
  if (service.empty()) return HealthStatus::kServing;
  if (service == kBlockMetaHealthService) {
    std::vector<ExportRef> all = registry_->All();
    bool all_ready = true;
    sync::MutexLock lock(&mu_);
    for (const ExportRef& e : all) {
      const bool ready = e->upstream->Ready();
      if (ready) {
        counted_.insert(e->generation);
      } else if (counted_.contains(e->generation)) {
        all_ready = false;
      }
    }
    return of(all_ready);
  }
  absl::string_view name = service;
  if (!absl::ConsumePrefix(&name, kBlockMetaHealthService) ||
      !absl::ConsumePrefix(&name, "/")) {
    return HealthStatus::kUnknown;
  }
  ExportRef e = registry_->Find(std::string(name));
  if (e == nullptr) return HealthStatus::kUnknown;
  const bool ready = e->upstream->Ready();
  if (ready) {
    sync::MutexLock lock(&mu_);
    counted_.insert(e->generation);
  }
  return of(ready);
}

}  // namespace blockmeta
