// `vtw`: the command-line tool. Each subcommand lives in cli/*_command.cc and the job folders.
#include <CLI/CLI.hpp>

#include "cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"vtw: LLaVA inference with Visual Tokens Withdrawal"};
  app.require_subcommand(1);
  vtw::tools::RegisterGenerateCommand(app);
  vtw::tools::RegisterDatasetCommand(app);
  vtw::tools::RegisterEvalCommand(app);
  vtw::tools::RegisterCalibrateCommand(app);
  vtw::tools::RegisterTrainCommand(app);
  vtw::tools::RegisterClientCommand(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
