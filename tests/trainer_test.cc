// The trainer (train/trainer.h) and the tokenizer trainer (train/tokenizer_trainer.h) on a tiny
// configuration: the tokenizer spm_train produces loads in our Tokenizer and round-trips the
// task text; a few training steps lower the loss; the written directory loads as a model
// bundle, generates and holds every HF tensor (the unused ones included); a resumed run
// continues at the same step with bit-identical losses.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "server/generator.h"
#include "server/model_bundle.h"
#include "train/tokenizer_trainer.h"
#include "train/trainer.h"

namespace vtw::tools {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() /
                         ("vtw_trainer_test_" + std::to_string(getpid())));
    fs::create_directories(*root_);
    if (FindExecutable("spm_train").empty()) return;
    TokenizerTrainOptions to;
    to.out_dir = (*root_ / "tokenizer").string();
    tokenizer_status_ = new Status(TrainTokenizer(to, nullptr));
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*root_, ec);
    delete root_;
    delete tokenizer_status_;
  }
  void SetUp() override {
    if (FindExecutable("spm_train").empty()) {
      GTEST_SKIP() << "spm_train (Debian/Ubuntu package 'sentencepiece') is not installed: the "
                      "trainer's tokenizer cannot be trained";
    }
    ASSERT_TRUE(tokenizer_status_->ok()) << tokenizer_status_->ToString();
  }
  static std::string TokenizerDir() { return (*root_ / "tokenizer").string(); }

  static TrainOptions TinyOptions(const std::string& name) {
    TrainOptions o;
    o.out_dir = (*root_ / name).string();
    o.tokenizer_dir = TokenizerDir();
    o.preset = "tiny";
    o.train_count = 240;
    o.val_count = 30;
    o.steps = 8;
    o.batch_size = 12;
    o.lr = 3e-3;
    o.warmup = 2;
    o.threads = 1;
    o.seed = 3;
    o.eval_every = 0;
    o.final_eval_all_k = false;
    return o;
  }

  static fs::path* root_;
  static Status* tokenizer_status_;
};

fs::path* TrainerTest::root_ = nullptr;
Status* TrainerTest::tokenizer_status_ = nullptr;

TEST_F(TrainerTest, TokenizerLoadsAndRoundTripsTaskText) {
  auto tok = Tokenizer::Load(TokenizerDir());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.unk_id(), 0);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.image_token_id(), t.sp_vocab_size());
  EXPECT_EQ(t.pad_id(), t.sp_vocab_size() + 1);
  EXPECT_FALSE(t.legacy());
  int singles = 0;
  Status s = CheckTaskTokenization(t, &singles);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(singles, static_cast<int>(AllTaskAnswers().size())) << "answers should be one token";
  for (const std::string& q : AllTaskQuestions()) {
    EXPECT_EQ(t.Decode(t.Encode(q, true), true), q);
  }
  // Words outside the task still tokenize (byte fallback), without <unk>.
  const std::string other = "Zebra crossings: ¿qué? 日本";
  std::vector<int32_t> ids = t.Encode(other, false);
  EXPECT_EQ(t.Decode(ids, true), other);
  for (int32_t id : ids) EXPECT_NE(id, t.unk_id());
}

// `steps` losses were recorded and the mean of the last three is below 3/4 of the first three's.
void ExpectLossFell(const std::vector<double>& losses, size_t steps) {
  ASSERT_EQ(losses.size(), steps);
  const double first = (losses[0] + losses[1] + losses[2]) / 3;
  const double last = (losses[steps - 3] + losses[steps - 2] + losses[steps - 1]) / 3;
  EXPECT_LT(last, 0.75 * first) << "first " << first << " last " << last;
}

TEST_F(TrainerTest, FewStepsLowerTheLossAndTheDirectoryLoads) {
  TrainOptions o = TinyOptions("model");
  o.steps = 30;
  o.vtw_train_fraction = 0.3;
  o.vtw_train_min_layer = 1;
  auto r = RunTraining(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ExpectLossFell(r->losses, 30);

  // Every tensor of the canonical HF naming is saved, including the ones the runtime skips.
  auto store = WeightStore::OpenDirectory(o.out_dir);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto model = LlavaModel::Load(o.out_dir, at::kFloat);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  LlavaWeights w;
  ResizeLlavaWeights((*model)->config(), &w);
  size_t expected = 0;
  ForEachLlavaTensor((*model)->config(), &w,
                     [&](const std::string& name, const std::vector<int64_t>& shape, at::Tensor*,
                         InitKind) {
                       ++expected;
                       const TensorView* v = (*store)->Find(name);
                       ASSERT_NE(v, nullptr) << name;
                       EXPECT_EQ(v->shape, shape) << name;
                     });
  EXPECT_EQ((*store)->Names().size(), expected);
  EXPECT_NE((*store)->Find("vision_tower.vision_model.post_layernorm.weight"), nullptr);
  EXPECT_NE((*store)->Find("vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"), nullptr);
  for (const char* f : {"config.json", "tokenizer.model", "tokenizer_config.json",
                        "special_tokens_map.json", "added_tokens.json",
                        "preprocessor_config.json", "generation_config.json", "training.json"}) {
    EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / f)) << f;
  }

  // The bundle loads and generates.
  auto bundle = ModelBundle::Load(o.out_dir, at::kFloat);
  ASSERT_TRUE(bundle.ok()) << bundle.status().ToString();
  std::mt19937_64 rng(5);
  Scene scene = RandomScene(rng);
  auto bytes = EncodeScene(scene, RenderScene(scene));
  ASSERT_TRUE(bytes.ok());
  auto prepared = PreparePrompt(
      **bundle, std::string_view(reinterpret_cast<const char*>(bytes->data()), bytes->size()),
      "How many shapes are there?", false, 4, ImageLimits{});
  ASSERT_TRUE(prepared.ok()) << prepared.status().ToString();
  at::Tensor features = (*bundle)->model->EncodeImages(prepared->pixel_values)[0];
  GenerateOptions g;
  g.withdraw_layer = (*bundle)->model->num_layers();  // VTW off
  g.stop.max_new_tokens = 4;
  g.stop.eos_id = (*bundle)->tokenizer->eos_id();
  auto gen = GenerateOne(*(*bundle)->model, (*bundle)->tokenizer.get(), prepared->layout,
                         features, g);
  ASSERT_TRUE(gen.ok()) << gen.status().ToString();
  EXPECT_FALSE(gen->token_ids.empty());

  // The trainer's teacher-forced evaluation matches greedy generation on the first answer
  // token: both come from the same forward code.
  auto tok = Tokenizer::Load(o.out_dir);
  ASSERT_TRUE(tok.ok());
  auto split = BuildSplit("test", 12, 9, 3, **tok, (*model)->config(), 1, nullptr);
  ASSERT_TRUE(split.ok()) << split.status().ToString();
  EvalResult eval = Evaluate(**model, *split, (*model)->num_layers());
  EXPECT_EQ(eval.count, 12);
  // Patch labels for the auxiliary loss: some patches are covered by shapes, and a patch has a
  // colour exactly when it has a kind.
  ASSERT_EQ(split->patch_color.size(1), (*model)->config().num_image_tokens());
  EXPECT_GT(split->patch_color.gt(0).sum().item<int64_t>(), 0);
  EXPECT_TRUE(split->patch_color.gt(0).equal(split->patch_kind.gt(0)));
  EXPECT_LE(split->patch_color.max().item<int64_t>(), 6);
  EXPECT_LE(split->patch_kind.max().item<int64_t>(), 3);
}

// The shipped recipe's stages on the tiny geometry: vision pre-training on the patch labels,
// then multi-turn sequences (several questions of one image per sequence) with the auxiliary
// loss and VTW-aware withdrawal; the loss falls and the model loads.
// --init-from: a fine-tune starts at the given model's weights (with a vanishing learning rate
// they come out unchanged, and its first loss is the trained model's, not a random one's), the
// varied scene style trains, and a directory without weights is an error naming it.
TEST_F(TrainerTest, InitFromStartsAtTheGivenWeightsWithVariedScenes) {
  TrainOptions a = TinyOptions("init_a");
  a.steps = 30;
  auto ra = RunTraining(a, nullptr);
  ASSERT_TRUE(ra.ok()) << ra.status().ToString();

  TrainOptions b = TinyOptions("init_b");
  b.init_from = a.out_dir;
  b.varied_style = true;
  b.steps = 2;
  b.lr = 1e-12;
  b.warmup = 0;
  b.weight_decay = 0;
  auto rb = RunTraining(b, nullptr);
  ASSERT_TRUE(rb.ok()) << rb.status().ToString();
  TrainOptions fresh = TinyOptions("init_fresh");
  fresh.steps = 2;
  auto rf = RunTraining(fresh, nullptr);
  ASSERT_TRUE(rf.ok()) << rf.status().ToString();
  ASSERT_FALSE(rb->losses.empty());
  ASSERT_FALSE(rf->losses.empty());
  EXPECT_LT(rb->losses.front(), 0.8 * rf->losses.front())
      << "a fine-tune's first loss should be the trained model's, far below a random init's";

  auto wa = WeightStore::OpenDirectory(a.out_dir);
  auto wb = WeightStore::OpenDirectory(b.out_dir);
  ASSERT_TRUE(wa.ok() && wb.ok());
  int compared = 0;
  for (const std::string& name : (*wa)->Names()) {
    const TensorView* va = (*wa)->Find(name);
    const TensorView* vb = (*wb)->Find(name);
    ASSERT_NE(vb, nullptr) << name;
    auto fa = ToFloatVector(*va);
    auto fb = ToFloatVector(*vb);
    ASSERT_TRUE(fa.ok() && fb.ok()) << name;
    ASSERT_EQ(fa->size(), fb->size()) << name;
    float worst = 0;
    for (size_t i = 0; i < fa->size(); ++i) worst = std::max(worst, std::abs((*fa)[i] - (*fb)[i]));
    EXPECT_LT(worst, 1e-5) << name;
    ++compared;
  }
  EXPECT_GT(compared, 20);

  TrainOptions bad = TinyOptions("init_bad");
  bad.init_from = (fs::path(a.out_dir) / "no-such-dir").string();
  auto rbad = RunTraining(bad, nullptr);
  ASSERT_FALSE(rbad.ok());
  EXPECT_NE(rbad.status().ToString().find("no-such-dir"), std::string::npos) << rbad.status().ToString();
}

TEST_F(TrainerTest, VisionStageAndMultiTurnSequencesTrain) {
  TrainOptions o = TinyOptions("multiturn");
  o.steps = 30;
  o.questions_per_image = 4;
  o.turns = 4;
  o.batch_size = 6;  // sequences (images) per step
  o.aux_patch_loss = 0.5;
  o.vision_steps = 10;
  o.vision_batch = 8;
  o.vtw_train_fraction = 0.5;
  o.vtw_train_min_layer = 1;
  auto r = RunTraining(o, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ExpectLossFell(r->losses, 30);
  EXPECT_TRUE(LlavaModel::Load(o.out_dir, at::kFloat).ok());

  // Too many turns for the model's positions: a clear error before any training.
  TrainOptions bad = TinyOptions("multiturn-bad");
  bad.questions_per_image = 16;
  bad.turns = 16;
  auto rb = RunTraining(bad, nullptr);
  ASSERT_FALSE(rb.ok());
  EXPECT_NE(rb.status().message().find("--turns"), std::string::npos) << rb.status().ToString();
}

TEST_F(TrainerTest, VtwTrainingLayerRangeIsDrawnFromCheckedAndRecorded) {
  // Four decoder layers, every sequence withdrawn: the default range draws K in [1, 3], a
  // narrow one only K = 1, so the same seed trains differently, and the record says which.
  auto options = [&](const std::string& name, int max_layer) {
    TrainOptions o = TinyOptions(name);
    o.geometry.text_layers = 4;
    o.vtw_train_fraction = 1.0;
    o.vtw_train_min_layer = 1;
    o.vtw_train_max_layer = max_layer;
    return o;
  };
  auto recorded = [](const TrainOptions& o) {
    std::ifstream in(o.out_dir + "/training.json");
    return nlohmann::json::parse(in).at("vtw_aware_training");
  };
  const TrainOptions wide = options("range_wide", -1);
  const TrainOptions narrow = options("range_narrow", 1);
  auto rw = RunTraining(wide, nullptr);
  auto rn = RunTraining(narrow, nullptr);
  auto rn2 = RunTraining(options("range_narrow2", 1), nullptr);
  ASSERT_TRUE(rw.ok()) << rw.status().ToString();
  ASSERT_TRUE(rn.ok()) << rn.status().ToString();
  ASSERT_TRUE(rn2.ok()) << rn2.status().ToString();
  EXPECT_NE(rw->losses, rn->losses) << "the withdrawal layers drawn should depend on the range";
  EXPECT_EQ(rn->losses, rn2->losses);
  const nlohmann::json wide_record = recorded(wide);
  EXPECT_EQ(wide_record.at("min_layer"), 1);
  EXPECT_EQ(wide_record.at("max_layer"), 3);
  EXPECT_EQ(recorded(narrow).at("max_layer"), 1);

  for (int bad_max : {0, 4}) {  // below the minimum; past the last layer
    auto rb = RunTraining(options("range_bad", bad_max), nullptr);
    ASSERT_FALSE(rb.ok()) << bad_max;
    EXPECT_NE(rb.status().message().find("--vtw-train-max-layer"), std::string::npos)
        << rb.status().ToString();
    EXPECT_NE(rb.status().message().find("4 decoder layers"), std::string::npos)
        << rb.status().ToString();
  }
}

TEST_F(TrainerTest, DistillationMatchesAFrozenTeacherAndIsRecorded) {
  TrainOptions base = TinyOptions("distill_base");
  base.steps = 30;
  ASSERT_TRUE(RunTraining(base, nullptr).ok());
  auto options = [&](const std::string& name, double fraction, double lr) {
    TrainOptions o = TinyOptions(name);
    o.init_from = base.out_dir;
    o.vtw_distill = 1.0;
    o.vtw_train_fraction = fraction;
    o.vtw_train_min_layer = 0;  // the text never sees the image
    o.vtw_train_max_layer = 0;
    o.lr = lr;
    o.warmup = 0;
    o.weight_decay = 0;
    return o;
  };
  auto kl = [](const TrainOptions& o) {
    std::ifstream in(o.out_dir + "/training.json");
    const nlohmann::json d = nlohmann::json::parse(in).at("distillation");
    EXPECT_EQ(d.at("weight"), 1.0);
    EXPECT_EQ(d.at("teacher"), o.init_from);
    return d.at("final_kl_ema").get<double>();
  };
  // The student starts as the teacher: with no withdrawal and no learning there is nothing to
  // distil; withdrawn at K = 0 it answers differently from the teacher.
  const TrainOptions same = options("distill_same", 0.0, 1e-12);
  const TrainOptions withdrawn = options("distill_k0", 1.0, 1e-12);
  ASSERT_TRUE(RunTraining(same, nullptr).ok());
  ASSERT_TRUE(RunTraining(withdrawn, nullptr).ok());
  const double kl_same = kl(same), kl_withdrawn = kl(withdrawn);
  EXPECT_LT(kl_same, 1e-9);
  EXPECT_GT(kl_withdrawn, 1e-6);
  // The teacher is a copy, frozen: a student that learns moves away from it.
  const TrainOptions moving = options("distill_moving", 0.0, 3e-3);
  auto rm = RunTraining(moving, nullptr);
  ASSERT_TRUE(rm.ok()) << rm.status().ToString();
  EXPECT_GT(kl(moving), 1e-5);
  // The KL term changes the gradients: without it the same seed trains differently.
  TrainOptions plain = options("distill_off", 0.0, 3e-3);
  plain.vtw_distill = 0;
  auto rp = RunTraining(plain, nullptr);
  ASSERT_TRUE(rp.ok()) << rp.status().ToString();
  EXPECT_EQ(rp->losses.front(), rm->losses.front());
  EXPECT_NE(rp->losses.back(), rm->losses.back());

  TrainOptions no_teacher = options("distill_bad", 0.5, 3e-3);
  no_teacher.init_from.clear();
  auto rb = RunTraining(no_teacher, nullptr);
  ASSERT_FALSE(rb.ok());
  EXPECT_NE(rb.status().message().find("--vtw-distill needs --init-from"), std::string::npos)
      << rb.status().ToString();
}

TEST_F(TrainerTest, ResumeContinuesWithIdenticalLosses) {
  // With VTW-aware sampling and the auxiliary head, whose state must be checkpointed too.
  TrainOptions full = TinyOptions("full");
  full.vtw_train_fraction = 0.5;
  full.aux_patch_loss = 0.5;
  auto a = RunTraining(full, nullptr);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_EQ(a->losses.size(), 8u);

  TrainOptions first = TinyOptions("part");
  first.vtw_train_fraction = 0.5;
  first.aux_patch_loss = 0.5;
  first.checkpoint_dir = (*root_ / "ckpt").string();
  first.checkpoint_every = 0;
  first.stop_after = 4;
  auto b = RunTraining(first, nullptr);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_EQ(b->losses.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b->losses[i], a->losses[i]) << "step " << i;

  TrainOptions second = first;
  second.stop_after = 0;
  second.resume = true;
  auto c = RunTraining(second, nullptr);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->start_step, 4);
  ASSERT_EQ(c->losses.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(c->losses[i], a->losses[4 + i]) << "step " << 4 + i;
}

}  // namespace
}  // namespace vtw::tools

// The auxiliary patch labels describe the pixels the vision tower sees: on the shipped model's
// geometry, patches labelled as covered by a shape are saturated (shape colours) and the
// others are not (light grey backgrounds), and the labelled colour is the patch's colour.
TEST(PatchLabels, AgreeWithThePreprocessedPixels) {
  const std::string dir = std::string(VTW_SOURCE_DIR) + "/models/vtw-shapes";
  auto config = vtw::LoadLlavaConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  auto tok = vtw::Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto split = vtw::tools::BuildSplit("val", 60, 3, 3, **tok, *config, 1, nullptr);
  ASSERT_TRUE(split.ok()) << split.status().ToString();
  const int64_t n = split->pixels_u8.size(0), s = split->pixels_u8.size(3);
  const int64_t patch = config->vision.patch_size;
  const int64_t grid = s / patch;
  at::Tensor px = split->pixels_u8.to(at::kFloat);  // bytes [n, 3, s, s]
  // Saturation per pixel, averaged per patch: [n, grid, grid].
  at::Tensor sat = std::get<0>(px.max(1)) - std::get<0>(px.min(1));
  at::Tensor patch_sat =
      sat.view({n, grid, patch, grid, patch}).mean({2, 4}).view({n, grid * grid});
  at::Tensor covered = split->patch_kind.gt(0);
  const double sat_covered = patch_sat.masked_select(covered).mean().item<double>();
  const double sat_free = patch_sat.masked_select(covered.logical_not()).mean().item<double>();
  std::ostringstream map;
  for (int64_t p = 0; p < grid * grid; ++p) {
    map << split->patch_kind[0][p].item<int64_t>()
        << (patch_sat[0][p].item<double>() > 40 ? '#' : '.')
        << ((p + 1) % grid == 0 ? "\n" : " ");
  }
  EXPECT_GT(sat_covered, 3 * sat_free + 20) << "covered " << sat_covered << " free " << sat_free
                                            << "\nimage 0 (kind, # = saturated):\n" << map.str();
  std::cerr << "image 0 (kind label, # = saturated patch):\n" << map.str();
}
