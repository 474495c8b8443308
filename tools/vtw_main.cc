// `vtw`: the command-line tool. Subcommands are registered in tools/*_command.cc.
#include <CLI/CLI.hpp>

int main(int argc, char** argv) {
  CLI::App app{"vtw: LLaVA inference with Visual Tokens Withdrawal"};
  app.require_subcommand(1);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
