#include "vtw/withdrawal.h"

#include <string>

namespace vtw {

std::vector<int64_t> KvCapacityPerLayer(const PromptLayout& layout, int withdraw_layer,
                                        int num_layers, int64_t max_new_tokens) {
  std::vector<int64_t> capacity(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    capacity[l] =
        KvEntriesAtLayer(l, withdraw_layer, layout.num_text_tokens(), layout.num_image_tokens) +
        max_new_tokens;
  }
  return capacity;
}

Status CheckWithdrawLayerRange(int withdraw_layer, int num_layers) {
  if (withdraw_layer >= 0 && withdraw_layer <= num_layers) return Status::Ok();
  return InvalidArgument("VTW layer " + std::to_string(withdraw_layer) + " is outside [0, " +
                         std::to_string(num_layers) + "] (the model has " +
                         std::to_string(num_layers) + " decoder layers; " +
                         std::to_string(num_layers) + " means no withdrawal)");
}

Status CheckWithdrawLayer(const PromptLayout& layout, int withdraw_layer, int num_layers) {
  VTW_RETURN_IF_ERROR(CheckWithdrawLayerRange(withdraw_layer, num_layers));
  if (!WithdrawsImage(withdraw_layer, num_layers, layout.num_image_tokens)) return Status::Ok();
  if (!layout.kinds.empty() && layout.kinds.back() == TokenKind::kImage) {
    return InvalidArgument(
        "the prompt ends with <image>: with VTW the image tokens are withdrawn "
        "and no text token is left to predict from; add text after <image> or "
        "turn VTW off");
  }
  return Status::Ok();
}

}  // namespace vtw
