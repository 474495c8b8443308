// `vtw dataset`: writes one split of the synthetic shapes VQA dataset (shapes/shapes_dataset.h).
// Owns only the command-line surface; registration is not thread-safe (call from main).
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "shapes/shapes_dataset.h"

namespace vtw::tools {

void RegisterDatasetCommand(CLI::App& app) {
  auto opts = std::make_shared<DatasetOptions>();
  opts->seed = 1;  // same default for every split: the split name is mixed into the seed
  CLI::App* cmd = app.add_subcommand(
      "dataset", "Generate a split of the synthetic shapes VQA dataset (images + SPLIT.jsonl)");
  cmd->add_option("--out", opts->out_dir, "Output directory")->required();
  cmd->add_option("--split", opts->split, "Split name")
      ->check(CLI::IsMember({"train", "val", "test"}))
      ->capture_default_str();
  cmd->add_option("--count", opts->count, "Number of question/answer examples")
      ->required()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", opts->seed, "Dataset seed (mixed with the split name)")
      ->capture_default_str();
  cmd->add_option("--questions-per-image", opts->questions_per_image, "Questions per image")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_option("--threads", opts->threads, "Render threads (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  auto style = std::make_shared<std::string>("default");
  cmd->add_option("--scene-style", *style,
                  "default: the dataset's scenes; varied: also gradient / two-tone / white "
                  "backgrounds, outlines and wider rotations (renderer robustness)")
      ->check(CLI::IsMember({"default", "varied"}))
      ->capture_default_str();
  cmd->callback([opts, style]() {
    opts->scene.varied_style = *style == "varied";
    const Status status = GenerateDataset(*opts, &std::cerr);
    if (!status.ok()) {
      std::cerr << "vtw dataset: " << status.ToString() << "\n";
      std::exit(1);
    }
    std::exit(0);
  });
}

}  // namespace vtw::tools
