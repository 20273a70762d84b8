// client/du_command.h — the `blockmeta du EXPORT` command: how many bytes
// of an export (or a range) are data, hole, zero, dirty, ... in one
// GetTotals call, without streaming the map (docs/client.md, "du").
//
// DuCommand() is the command's table entry (cli.cc lists it); its runner
// calls DuRequestFromFlags, the client's GetTotals and PrintDu. The parsing
// and printing are transport-free and pure (du_command_test).
//
// base:allocation is always totalled (first), whatever --context names, so
// a dirty bitmap also shows its dirty_data / dirty_nonzero cross totals.
#ifndef BLOCKMETA_CLIENT_DU_COMMAND_H_
#define BLOCKMETA_CLIENT_DU_COMMAND_H_

#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "blockmeta/v1/blockmeta.pb.h"
#include "client/command.h"

namespace blockmeta::client {

enum class DuOutput { kHuman, kJson };

// The command's table entry (see command.h).
CommandSpec DuCommand();

// The command's flags, in help order.
const std::vector<FlagSpec>& DuFlagHelp();
// One-line summary and the help paragraph.
extern const char kDuSummary[];
extern const char kDuDetails[];

// Fills `request` and `output` from the export name and the parsed flags
// (name -> value, "" for booleans). Returns a usage error message (without
// the program name) on a bad value.
std::optional<std::string> DuRequestFromFlags(
    const std::string& export_name,
    const std::map<std::string, std::string>& flags,
    blockmeta::v1::GetTotalsRequest* request, DuOutput* output);

// Prints a GetTotals answer: human (aligned, sizes and percentages) or
// JSON (one object, numbers as JSON numbers; see docs/client.md).
void PrintDu(const blockmeta::v1::GetTotalsResponse& response, DuOutput output,
             std::ostream& out);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_DU_COMMAND_H_
