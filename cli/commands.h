// Registration of the `vtw` subcommands. Each Register* adds one subcommand to `app`; its
// callback runs the command and exits the process with the command's status code.
#pragma once

#include <CLI/CLI.hpp>

namespace vtw::tools {

void RegisterGenerateCommand(CLI::App& app);
void RegisterDatasetCommand(CLI::App& app);
void RegisterEvalCommand(CLI::App& app);  // also adds `study`
void RegisterCalibrateCommand(CLI::App& app);
void RegisterTrainCommand(CLI::App& app);
void RegisterClientCommand(CLI::App& app);

}  // namespace vtw::tools
