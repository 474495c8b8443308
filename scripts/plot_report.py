#!/usr/bin/env python3
"""Writes the VTW report (Markdown + SVG plots) from the JSON results of scripts/vtw-report.sh.

Python 3 standard library only: the SVG charts are written by hand.

  plot_report.py --work DIR --out docs/REPORT.md

DIR holds eval_withdraw.json, eval_block.json, eval_blank.json, calib.json, calib_by_type.json,
study.json (outputs of `vtw eval/calibrate/study --json`), their .cmd / .seconds files and
meta.json. Plots go to $(dirname OUT)/report/.
"""
import argparse
import collections
import html
import json
import math
import os
import sys

ETAS = (0.003, 0.01, 0.05)
ETA = 0.003  # the primary eta: its K is "the calibrated K" (--eta)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f"]


# ------------------------------------------------------------------------------------------------
# SVG line charts


def _nice_step(span, target=5):
    if span <= 0:
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v):
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return "%.0e" % v
    if a >= 100:
        return "%.0f" % v
    if a >= 1:
        return ("%.2f" % v).rstrip("0").rstrip(".")
    return ("%.3f" % v).rstrip("0").rstrip(".")


def line_chart(path, title, xlabel, ylabel, series, logy=False, ylim=None, xlim=None,
               hlines=(), xticks=None, width=680, height=420, note=None):
    """series: dicts with name, xs, ys, color, optional dash, labels (per point), marker."""
    left, right, top, bottom = 72, 190, 44, 64 if note else 48
    pw, ph = width - left - right, height - top - bottom

    def ty(v):
        return math.log10(v) if logy else v

    pts = [(x, y) for s in series for x, y in zip(s["xs"], s["ys"])
           if y is not None and (not logy or y > 0)]
    ys = [ty(y) for _, y in pts] + [ty(h["y"]) for h in hlines if not logy or h["y"] > 0]
    xs = [x for x, _ in pts]
    if not pts:
        xs, ys = [0, 1], [0, 1]
    x0, x1 = (xlim if xlim else (min(xs), max(xs)))
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if ylim:
        y0, y1 = ty(ylim[0]), ty(ylim[1])
    else:
        y0, y1 = min(ys), max(ys)
        if logy:
            y0, y1 = math.floor(y0), math.ceil(y1)
        else:
            pad = (y1 - y0) * 0.08 or 1
            y0, y1 = y0 - pad, y1 + pad
    if y0 == y1:
        y0, y1 = y0 - 1, y1 + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(v):
        return top + ph - (ty(v) - y0) / (y1 - y0) * ph

    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">' % (width, height, width, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>' % (left, html.escape(title))]
    # Grid and ticks.
    if logy:
        yt = [10 ** e for e in range(int(math.floor(y0)), int(math.ceil(y1)) + 1)]
    else:
        step = _nice_step(y1 - y0)
        yt, v = [], math.ceil(y0 / step) * step
        while v <= y1 + 1e-12:
            yt.append(round(v, 12))
            v += step
    for v in yt:
        y = py(v)
        if y < top - 0.5 or y > top + ph + 0.5:
            continue
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>' % (left, y, left + pw, y))
        out.append('<text x="%.1f" y="%.1f" text-anchor="end">%s</text>' % (left - 6, y + 4, _fmt(v)))
    if xticks is None:
        step = _nice_step(x1 - x0)
        xticks, v = [], math.ceil(x0 / step) * step
        while v <= x1 + 1e-12:
            xticks.append((round(v, 12), _fmt(v)))
            v += step
    for v, label in xticks:
        x = px(v)
        out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eeeeee"/>' % (x, top, x, top + ph))
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>' % (x, top + ph + 16, html.escape(label)))
    out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (left, top, pw, ph))
    out.append('<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>' % (left + pw / 2, top + ph + 34, html.escape(xlabel)))
    out.append('<text transform="translate(16,%.1f) rotate(-90)" text-anchor="middle">%s</text>'
               % (top + ph / 2, html.escape(ylabel)))
    legend = []
    for h in hlines:
        if logy and h["y"] <= 0:
            continue
        y = py(h["y"])
        if top <= y <= top + ph:
            out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" stroke-dasharray="6,4"/>'
                       % (left, y, left + pw, y, h.get("color", "#888")))
        legend.append((h["name"], h.get("color", "#888"), True, False))
    for s in series:
        coords = [(px(x), py(y)) for x, y in zip(s["xs"], s["ys"])
                  if y is not None and (not logy or y > 0)]
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        if len(coords) > 1 and s.get("line", True):
            out.append('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>'
                       % (s["color"], dash, " ".join("%.1f,%.1f" % c for c in coords)))
        for i, (cx, cy) in enumerate(coords):
            out.append('<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"/>' % (cx, cy, s["color"]))
        labels = s.get("labels")
        if labels:
            kept = [(x, y, l) for x, y, l in zip(s["xs"], s["ys"], labels)
                    if y is not None and (not logy or y > 0)]
            for x, y, label in kept:
                out.append('<text x="%.1f" y="%.1f" font-size="10" fill="%s">%s</text>'
                           % (px(x) + 5, py(y) - 6, s["color"], html.escape(label)))
        legend.append((s["name"], s["color"], bool(s.get("dash")), True))
    lx, ly = left + pw + 14, top + 8
    for name, color, dashed, marker in legend:
        out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>'
                   % (lx, ly, lx + 22, ly, color, ' stroke-dasharray="5,3"' if dashed else ""))
        if marker:
            out.append('<circle cx="%d" cy="%d" r="3.5" fill="%s"/>' % (lx + 11, ly, color))
        # wrap long legend names
        words, line, lines = name.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > 24 and line:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for i, l in enumerate(lines):
            out.append('<text x="%d" y="%d">%s</text>' % (lx + 28, ly + 4 + 14 * i, html.escape(l)))
        ly += 14 * len(lines) + 8
    if note:
        out.append('<text x="%d" y="%d" font-size="10" fill="#666">%s</text>' % (left, top + ph + 54, html.escape(note)))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------------
# Helpers


def load(work, name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)


def read_json(path):
    """The JSON object in `path`, or {} when it is missing, empty or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_optional(work, name):
    """The JSON result `name`, or None when the step did not run."""
    return read_json(os.path.join(work, name + ".json")) or None


def read_text(work, name, default=""):
    try:
        with open(os.path.join(work, name)) as f:
            return f.read().strip().replace(os.path.abspath(work), "$WORK")
    except OSError:
        return default


def pct(v):
    return "%.1f" % (100.0 * v)


def kname(k, layers):
    return "off" if k >= layers else str(k)


# Allowed answers per question type (shapes/shapes_dataset.h).
NUM_ANSWERS = {"color": 6, "shape": 3, "count_shape": 5, "count_all": 4, "exists": 2, "side": 2}


def answer_baselines(jsonl):
    """Per type: number of possible answers and the majority answer's share in the test set."""
    by_type = collections.defaultdict(collections.Counter)
    try:
        with open(jsonl) as f:
            for line in f:
                if line.strip():
                    e = json.loads(line)
                    by_type[e.get("type", "unknown")][e.get("answer", "").lower()] += 1
    except OSError:
        return {}
    return {t: (NUM_ANSWERS.get(t, len(c)), max(c.values()) / sum(c.values()))
            for t, c in by_type.items()}


def model_summary(model_dir):
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError):
        return {}
    t, v = c.get("text_config", {}), c.get("vision_config", {})
    return {
        "text_layers": t.get("num_hidden_layers"), "hidden": t.get("hidden_size"),
        "heads": t.get("num_attention_heads"), "kv_heads": t.get("num_key_value_heads"),
        "intermediate": t.get("intermediate_size"), "vocab": t.get("vocab_size"),
        "vision_layers": v.get("num_hidden_layers"), "vision_hidden": v.get("hidden_size"),
        "image_size": v.get("image_size"), "patch": v.get("patch_size"),
        "feature_layer": c.get("vision_feature_layer"),
    }


# ------------------------------------------------------------------------------------------------
# Report


def write_whole_request(w, gen, res, ks, L, k003):
    """Prefill-only vs whole-request FLOPs, and one request's FLOPs by phase."""
    w("## Compute per request: prefill only vs the whole request")
    w("")
    w("'prefill saved' (the paper's measure, and the one VTW acts on) vs 'whole request saved' "
      "(vision tower + prefill + decode, what a request costs), per K, on the test set (answers "
      "end at EOS after about %.0f tokens):" % res[L]["mean_generated_tokens"])
    w("")
    w("| K | prefill saved % | whole request saved % | accuracy % |")
    w("|---|---|---|---|")
    for k in ks:
        r = res[k]
        name = ("**%s**" % kname(k, L)) if k == k003 else kname(k, L)
        w("| %s | %.1f | %.1f | %s |" % (name, r["prefill_flops_saved_pct"], r["flops_saved_pct"],
                                          pct(r["accuracy"])))
    w("")
    if gen and "flops_breakdown" in gen:
        b = gen["flops_breakdown"]
        tot, tot0 = gen["flops"], gen["flops_without_vtw"]
        w("One request by phase (`vtw generate --json`, the first test question, default "
          "`--max-new-tokens`, K = %s, %d tokens generated):" % (
              kname(gen.get("vtw_layer", L) if gen.get("vtw_layer") is not None else L, L),
              len(gen.get("token_ids", []))))
        w("")
        w("| phase | MFLOPs without VTW | share of the request | MFLOPs with VTW | saved % |")
        w("|---|---|---|---|---|")
        for phase, with_, without in (("vision tower", b["vision"], b["vision"]),
                                      ("prefill", b["prefill"], b["prefill_without_vtw"]),
                                      ("decode", b["decode"], b["decode_without_vtw"])):
            w("| %s | %.1f | %.1f%% | %.1f | %.1f |" % (
                phase, without / 1e6, 100.0 * without / tot0, with_ / 1e6,
                100.0 * (without - with_) / without if without else 0))
        w("| **whole request** | %.1f | 100%% | %.1f | **%.1f** |" % (
            tot0 / 1e6, tot / 1e6, 100.0 * (tot0 - tot) / tot0))
        w("")
        w("VTW removes prefill and decode work only; the vision tower's share bounds what any K can "
          "save of a whole request (K = 0 would save %.1f%%)." % res[0]["flops_saved_pct"])
        w("")


def write_independent(w, indep, res, types, ks, L, k003, meta, cmd):
    """Accuracy per K and type on the independent (cairo-drawn) set, next to the test set."""
    ires = {r["layer"]: r for r in indep["results"]}
    w("## Independent evaluation set (another renderer)")
    w("")
    w("%d questions on %d images drawn by `scripts/make-independent-eval.py --seed %s` with cairo "
      "(python3-cairo), not OpenCV: cairo's antialiasing (none / gray / best), outlines in a "
      "darker shade or near-black with 1-4 px lines and mitre/round/bevel joins, white, gradient "
      "and two-tone backgrounds, images 56-256 px, shapes 14-38%% of the crop, rotations up to 25 "
      "degrees. Same six question templates and answer words as `vtw dataset`; never used in "
      "training. `%s`" % (indep["num_examples"], indep["num_images"],
                          meta.get("independent_seed", "?"), cmd))
    w("")
    head = ["K", "acc %", "vs test set"] + types + ["whole request saved %"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for k in ks:
        r = ires[k]
        row = [("**%s**" % kname(k, L)) if k == k003 else kname(k, L), pct(r["accuracy"]),
               "%+.1f" % (100 * (r["accuracy"] - res[k]["accuracy"]))]
        row += [pct(r["per_type"][t]["accuracy"]) for t in types]
        row += ["%.1f" % r["flops_saved_pct"]]
        w("| " + " | ".join(row) + " |")
    w("")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eta", type=float, default=0.003,
                    help="the calibration threshold whose K is 'the calibrated K' (one of %s)" % (ETAS,))
    args = ap.parse_args()
    global ETA
    if args.eta not in ETAS:
        ap.error("--eta must be one of %s" % (ETAS,))
    ETA = args.eta
    work = args.work
    meta = load(work, "meta")
    ev = load(work, "eval_withdraw")
    block = load(work, "eval_block")
    blank = load(work, "eval_blank")
    calib = load(work, "calib")
    calib_bt = load(work, "calib_by_type")
    study = load(work, "study")
    indep = load_optional(work, "eval_independent")
    gen = load_optional(work, "generate_default")

    L = ev["num_layers"]
    res = {r["layer"]: r for r in ev["results"]}
    bres = {r["block_layers"]: r for r in block["results"]}
    off = res[L]
    types = sorted(off["per_type"].keys())
    picked = {p["eta"]: p["layer"] for p in calib["picked"]}
    baselines = answer_baselines(meta.get("test_jsonl", ""))
    geo = model_summary(meta["model"])

    out_dir = os.path.dirname(os.path.abspath(args.out))
    plot_dir = os.path.join(out_dir, "report")
    os.makedirs(plot_dir, exist_ok=True)
    rel = os.path.relpath(plot_dir, out_dir)

    # --- plots ---
    ks = list(range(L + 1))
    kticks = [(k, kname(k, L)) for k in ks]
    line_chart(os.path.join(plot_dir, "kl_vs_k.svg"),
               "Mean KL(p_vtw || p_full) vs withdrawal layer K", "K (image tokens withdrawn before layer K)",
               "mean KL (log scale)",
               [{"name": "calibration (%d samples)" % calib["num_samples"], "xs": ks[:-1],
                 "ys": calib["mean_kl"][:-1], "color": COLORS[0]},
                {"name": "test set (%d questions)" % ev["num_examples"], "xs": ks[:-1],
                 "ys": [res[k]["mean_kl"] for k in ks[:-1]], "color": COLORS[1], "dash": True}],
               logy=True, xticks=kticks[:-1], xlim=(0, max(1, L - 1)),
               hlines=[{"name": "eta = %g" % e, "y": e, "color": c}
                       for e, c in zip(ETAS, ("#2ca02c", "#ff7f0e", "#9467bd"))],
               note="K = %d (no withdrawal) has KL 0 and is not drawn on the log scale." % L)
    full_gf = off["mean_prefill_flops"] / 1e9
    line_chart(os.path.join(plot_dir, "accuracy_vs_flops.svg"),
               "Accuracy vs prefill compute (test set)", "mean prefill GFLOPs per question",
               "accuracy %",
               [{"name": "VTW at K (label)", "xs": [res[k]["mean_prefill_flops"] / 1e9 for k in ks],
                 "ys": [100 * res[k]["accuracy"] for k in ks], "color": COLORS[0],
                 "labels": ["K=" + kname(k, L) for k in ks]}]
               + [{"name": t, "xs": [res[k]["mean_prefill_flops"] / 1e9 for k in ks],
                   "ys": [100 * res[k]["per_type"][t]["accuracy"] for k in ks],
                   "color": COLORS[(i + 2) % len(COLORS)], "dash": True}
                  for i, t in enumerate(types)],
               ylim=(0, 100), note="Full model: %.4f GFLOPs prefill; x = decoder + lm_head prefill FLOPs." % full_gf)
    layers = study["layers"]
    li = list(range(len(layers)))
    line_chart(os.path.join(plot_dir, "attention_sink.svg"),
               "Last prompt token's attention mass per layer", "decoder layer", "share of attention",
               [{"name": "BOS", "xs": li, "ys": [l["bos"] for l in layers], "color": COLORS[1]},
                {"name": "image tokens (%d)" % study["mean_image_tokens"], "xs": li,
                 "ys": [l["image"] for l in layers], "color": COLORS[0]},
                {"name": "other text (prefix + question)", "xs": li,
                 "ys": [l["prefix_text"] + l["question_text"] for l in layers], "color": COLORS[2]},
                {"name": "itself", "xs": li, "ys": [l["self"] for l in layers], "color": COLORS[3],
                 "dash": True}],
               ylim=(0, 1), xticks=[(i, str(i)) for i in li],
               note="Full model, mean over heads and %d test prompts." % study["num_samples"])
    line_chart(os.path.join(plot_dir, "attention_per_token.svg"),
               "Attention per key token (last prompt token)", "decoder layer", "mean attention per token (log)",
               [{"name": "per image token", "xs": li, "ys": [l["image_per_token"] for l in layers],
                 "color": COLORS[0]},
                {"name": "per text token", "xs": li, "ys": [l["text_per_token"] for l in layers],
                 "color": COLORS[2]}],
               logy=True, xticks=[(i, str(i)) for i in li])
    blank_acc = blank["accuracy"]
    line_chart(os.path.join(plot_dir, "information_migration.svg"),
               "Information migration check (test set)", "K", "accuracy %",
               [{"name": "image withdrawn from layer K on (VTW)", "xs": ks,
                 "ys": [100 * res[k]["accuracy"] for k in ks], "color": COLORS[0]},
                {"name": "text->image attention blocked in layers < K", "xs": ks,
                 "ys": [100 * bres[k]["accuracy"] for k in ks], "color": COLORS[1]}],
               ylim=(0, 100), xticks=[(k, str(k)) for k in ks],
               hlines=[{"name": "full model", "y": 100 * off["accuracy"], "color": "#555"},
                       {"name": "blank image, full model", "y": 100 * blank_acc, "color": "#bbb"}])

    # --- numbers for the text ---
    k003 = picked.get(ETA, L)  # the calibrated K at the primary eta
    acc_off = off["accuracy"]
    min_type = min(types, key=lambda t: off["per_type"][t]["accuracy"])
    at_k = res[k003]
    loss_pts = 100 * (acc_off - at_k["accuracy"])
    saved = at_k["prefill_flops_saved_pct"]
    acc_ok = acc_off >= 0.90 and all(off["per_type"][t]["accuracy"] >= 0.80 for t in types)
    vtw_ok = saved >= 40.0 and loss_pts <= 1.0
    # Best K on the test set that keeps accuracy within 1 point (reported, not used to pick K).
    within1 = [k for k in ks if 100 * (acc_off - res[k]["accuracy"]) <= 1.0]
    k_min_ok = min(within1) if within1 else L

    r0 = res[0]

    def yesno(b):
        return "**yes**" if b else "**no**"

    md = []
    w = md.append
    w("# Visual Tokens Withdrawal on `%s`: accuracy, compute, calibration, attention sink, "
      "information migration" % os.path.basename(os.path.normpath(meta["model"])))
    w("")
    w("Generated by `scripts/vtw-report.sh %s` (git %s, %s, %d CPUs). Do not edit by hand; rerun the script."
      % (meta["model"], meta.get("git", "?"), meta.get("date", "?"), meta.get("host_cpus", 0)))
    w("")
    w("- Model: `%s`: %s decoder layers (hidden %s, %s heads / %s KV heads, MLP %s, vocab %s); "
      "CLIP tower %s layers (hidden %s, %spx images, patch %s) -> **%d image tokens** per image; "
      "about %.0f text tokens per prompt."
      % (meta["model"], geo.get("text_layers"), geo.get("hidden"), geo.get("heads"), geo.get("kv_heads"),
         geo.get("intermediate"), geo.get("vocab"), geo.get("vision_layers"), geo.get("vision_hidden"),
         geo.get("image_size"), geo.get("patch"), ev["num_image_tokens"], study["mean_text_tokens"]))
    training = read_json(os.path.join(meta["model"], "training.json"))
    vat = training.get("vtw_aware_training", {})
    base = read_json(os.path.join(meta["model"], "training-base.json"))
    if base:
        bdata = base.get("data", {}).get("train", {})
        w("- Base training (`%s/training-base.json`): steps %s-%s from random weights, %s train "
          "questions (split train, seed %s), %.0f min on %s threads; validation accuracy (VTW off) "
          "%s%%. Then the fine-tune below (`scripts/finetune-shipped-model.sh`)."
          % (meta["model"], base.get("start_step"), base.get("end_step"), bdata.get("questions", "?"),
             bdata.get("seed", "?"), base.get("seconds", 0) / 60, base.get("threads", "?"),
             pct(base.get("final_val", {}).get("accuracy", float("nan")))))
    if training and training.get("options", {}).get("init_from"):
        topt = training["options"]
        tdata = training.get("data", {}).get("train", {})
        w("- Fine-tune (`%s/training.json`): from those weights, %s steps on %s train questions "
          "(split train, seed %s)%s, peak lr %g, %.0f min on %s threads; validation accuracy "
          "(VTW off, default style) %s%%."
          % (meta["model"], training.get("end_step"), tdata.get("questions", "?"), tdata.get("seed", "?"),
             " drawn with renderer variation (`--varied-scenes`)" if topt.get("varied_style") else "",
             topt.get("lr", float("nan")), training.get("seconds", 0) / 60, training.get("threads", "?"),
             pct(training.get("final_val", {}).get("accuracy", float("nan")))))
    elif training:
        tdata = training.get("data", {}).get("train", {})
        w("- Training (`%s/training.json`): %s parameters, steps %s-%s, %s train questions (split "
          "train, seed %s), %.0f min on %s threads; final validation accuracy (VTW off) %s%%."
          % (meta["model"], "{:,}".format(training.get("parameters", 0)), training.get("start_step"),
             training.get("end_step"), tdata.get("questions", "?"), tdata.get("seed", "?"),
             training.get("seconds", 0) / 60, training.get("threads", "?"),
             pct(training.get("final_val", {}).get("accuracy", float("nan")))))
    if vat.get("fraction", 0) > 0:
        w("- **VTW-aware training**: %.0f%% of the training sequences had their image tokens "
          "withdrawn before a random layer in [%s, %s]. The paper applies VTW to a model trained "
          "without it; this model was taught to cope with withdrawal, which favours VTW's accuracy "
          "at K >= %s. Read the accuracy-vs-K results with that in mind."
          % (100 * vat["fraction"], vat.get("min_layer"), vat.get("max_layer"), vat.get("min_layer")))
    w("- Test set: %d questions on %d images, `vtw dataset --split test --seed %d` (held out: the "
      "trainer uses the train split; splits are disjoint). Calibration: the first %d questions of "
      "`--split val --seed %d` (never the test set)."
      % (ev["num_examples"], ev["num_images"], meta["seed"], calib["num_samples"], meta["seed"]))
    w("- Greedy decoding, at most %d new tokens; the prediction is the first word of the output, "
      "lowercased, punctuation removed; exact match with the answer. dtype %s, threads %s (0 = all cores)."
      % (ev["max_new_tokens"], ev["dtype"], meta.get("threads")))
    w("- FLOPs: exact matrix-product FLOPs of the decoder + lm_head (vtw/compute_model.h); "
      "'prefill saved' compares with the same prompt without withdrawal. Vision tower FLOPs are "
      "the same at every K and are included only in 'total'.")
    w("")
    w("## Summary")
    w("")
    w("- Full model (VTW off): **%s%%** accuracy; lowest type `%s` at %s%%. Acceptance (>= 90%% "
      "overall, >= 80%% every type): %s."
      % (pct(acc_off), min_type, pct(off["per_type"][min_type]["accuracy"]), yesno(acc_ok)))
    w("- Calibrated K (eta = %g, %d samples): **K = %s** of %d layers. On the test set: "
      "accuracy %s%% (%+.1f points vs off), **%.1f%% of prefill FLOPs saved** (%.1f%% of all FLOPs "
      "incl. vision and decoding). Acceptance (>= 40%% saved, <= 1 point lost): %s."
      % (ETA, calib["num_samples"], kname(k003, L), L, pct(at_k["accuracy"]), -loss_pts, saved,
         at_k["flops_saved_pct"], yesno(vtw_ok)))
    for e in [e for e in ETAS if e != ETA]:
        k = picked.get(e, L)
        r = res[k]
        w("- eta = %g: K = %s -> accuracy %s%% (%+.1f points), %.1f%% prefill saved."
          % (e, kname(k, L), pct(r["accuracy"]), 100 * (r["accuracy"] - acc_off),
             r["prefill_flops_saved_pct"]))
    w("- For reference only (chosen on the test set, not a calibration): the smallest K within 1 "
      "point of the full model is K = %s (%.1f%% prefill saved)."
      % (kname(k_min_ok, L), res[k_min_ok]["prefill_flops_saved_pct"]))
    w("- K = 0 (the text never sees the image): %s%% overall; per type: %s."
      % (pct(r0["accuracy"]), ", ".join(
          "%s %s%% (chance %s%%%s)" % (
              t, pct(r0["per_type"][t]["accuracy"]),
              pct(1.0 / baselines[t][0]) if t in baselines else "?",
              ", majority %s%%" % pct(baselines[t][1]) if t in baselines else "")
          for t in types)))
    # Whole request vs prefill only, at the calibrated K and at the smallest K that saves 35%.
    k35 = [k for k in ks if res[k]["flops_saved_pct"] >= 35.0]
    k35 = max(k35) if k35 else None
    w("- **Whole request** (vision + prefill + decode): at K = %s, **%.1f%% of all FLOPs saved** "
      "next to %.1f%% of prefill FLOPs (the vision tower and decoding, %.0f%% of a request's "
      "FLOPs here, are hardly touched by withdrawal). >= 35%% of the whole request needs K <= %s (%.1f%% saved), where accuracy "
      "is %s%% (%+.1f points vs off). Goal (>= 35%% whole-request at <= 1 point lost): %s."
      % (kname(k003, L), at_k["flops_saved_pct"], saved,
         100 * (1 - off["mean_prefill_flops"] / off["mean_flops"]) if off["mean_flops"] else 0,
         kname(k35, L) if k35 is not None else "?",
         res[k35]["flops_saved_pct"] if k35 is not None else 0,
         pct(res[k35]["accuracy"]) if k35 is not None else "?",
         100 * (res[k35]["accuracy"] - acc_off) if k35 is not None else 0,
         yesno(at_k["flops_saved_pct"] >= 35.0 and loss_pts <= 1.0)))
    if indep:
        ires = {r["layer"]: r for r in indep["results"]}
        ioff, ik = ires[L], ires[k003]
        imin = min(types, key=lambda t: ioff["per_type"][t]["accuracy"])
        iok = ioff["accuracy"] >= 0.92 and all(ioff["per_type"][t]["accuracy"] >= 0.85 for t in types)
        w("- **Independent set** (%d questions drawn with cairo, never trained on): VTW off **%s%%** "
          "(%+.1f points vs the test set), lowest type `%s` at %s%%; at K = %s %s%% (%+.1f points "
          "vs off). Goal (>= 92%% overall, >= 85%% every type, VTW off): %s."
          % (indep["num_examples"], pct(ioff["accuracy"]), 100 * (ioff["accuracy"] - acc_off), imin,
             pct(ioff["per_type"][imin]["accuracy"]), kname(k003, L), pct(ik["accuracy"]),
             100 * (ik["accuracy"] - ioff["accuracy"]), yesno(iok)))
    w("")
    # Plain conclusions, computed from the numbers.
    w("### What this model shows")
    w("")
    half = max(1, len(layers) // 2)

    def lrange(a, b):
        return "layer %d" % a if a == b else "layers %d-%d" % (a, b)

    img_early = sum(l["image"] for l in layers[:half]) / half
    img_late = sum(l["image"] for l in layers[half:]) / max(1, len(layers) - half)
    share = study["mean_image_tokens"] / (study["mean_image_tokens"] + study["mean_text_tokens"])
    ratio_late = [l["image_per_token"] / l["text_per_token"] for l in layers[half:] if l["text_per_token"] > 0]
    bos_late = sum(l["bos"] for l in layers[half:]) / max(1, len(layers) - half)
    ratio_early = [l["image_per_token"] / l["text_per_token"] for l in layers[:half] if l["text_per_token"] > 0]
    bos_early = sum(l["bos"] for l in layers[:half]) / half
    below_share = img_late < share and ratio_late and max(ratio_late) < 1.0
    declines = img_late < 0.8 * img_early
    uses_image = acc_off - r0["accuracy"] >= 0.05
    caveat = ("" if uses_image else
              " Caveat: the full model barely uses the image (%s%% vs %s%% with the image withdrawn "
              "before layer 0), so this says little about VTW." % (pct(acc_off), pct(r0["accuracy"])))

    def ratios(rs):
        if not rs:
            return "?"
        return "%.2fx" % rs[0] if len(rs) == 1 else "%.2f-%.2fx" % (min(rs), max(rs))

    if below_share and declines:
        verdict = ("This matches the paper's observation: deep layers attend little to the visual "
                   "tokens.")
    elif below_share:
        verdict = ("Image tokens get less attention per token than text tokens, but in every layer "
                   "alike: there is no clear drop with depth, so this model does **not** show the "
                   "paper's deep-layer attention sink.")
    else:
        verdict = ("This does **not** show the paper's pattern (image tokens still draw at least "
                   "their share of attention in deep layers).")
    w("- **Attention sink**: image tokens are %.0f%% of the prompt. The last prompt token gives them "
      "%.1f%% of its attention on average in %s and %.1f%% in %s; per token, an image token gets "
      "%s the attention of a text token in %s and %s in %s. BOS gets %.1f%% and %.1f%% (in LLaVA "
      "the first tokens absorb most attention in deep layers). %s%s"
      % (100 * share, 100 * img_early, lrange(0, half - 1), 100 * img_late,
         lrange(half, len(layers) - 1), ratios(ratio_early), lrange(0, half - 1),
         ratios(ratio_late), lrange(half, len(layers) - 1), 100 * bos_early, 100 * bos_late,
         verdict, caveat))
    kk = k003 if 1 <= k003 <= L - 1 else max(1, L // 2)
    wk, bk = res[kk]["accuracy"], bres[kk]["accuracy"]
    if not uses_image:
        verdict = ("Uninformative here: the model answers as well without the image (%s%% at "
                   "K = 0)." % pct(r0["accuracy"]))
    elif wk >= acc_off - 0.02 and bk <= wk - 0.10:
        verdict = ("The visual information the answer needs reaches the text tokens in the first "
                   "%d layers and is not read from the image tokens later, as the paper argues."
                   % kk)
    elif bk >= wk - 0.02:
        verdict = ("Blocking the text's view of the image in the first %d layers costs little: "
                   "this model can still read the image in later layers, which is **not** the "
                   "paper's migration picture." % kk)
    else:
        verdict = ("Partly as in the paper: blocking the first %d layers hurts, withdrawal at "
                   "%d hurts less." % (kk, kk))
    if vat.get("fraction", 0) > 0 and uses_image:
        verdict += (" Keep in mind that this model was trained with withdrawal at random layers "
                    "%s-%s, which rewards moving visual information into the text tokens early."
                    % (vat.get("min_layer"), vat.get("max_layer")))
    w("- **Information migration** at K = %d%s: withdrawing the image tokens from layer %d on "
      "gives %s%% accuracy, while keeping them but blocking the text's attention to them in layers "
      "< %d gives %s%% (full model %s%%, blank image %s%%, K = 0 %s%%). %s"
      % (kk, " (the calibrated K)" if kk == k003 else "", kk, pct(wk), kk, pct(bk), pct(acc_off),
         pct(blank_acc), pct(r0["accuracy"]), verdict))
    w("- **Calibration vs test**: the KL rule picked K = %s at eta %g; the test-set accuracy at "
      "that K is %s the full model's (%+.1f points)."
      % (kname(k003, L), ETA, "within 1 point of" if loss_pts <= 1.0 else "more than 1 point below", -loss_pts))
    w("")
    w("## Accuracy and compute per withdrawal layer K (test set)")
    w("")
    head = ["K", "acc %"] + types + ["prefill GFLOPs", "prefill saved %", "total saved %", "mean KL (test)",
                                      "mean KL (calib.)", "ms / question"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for k in ks:
        r = res[k]
        row = [("**%s**" % kname(k, L)) if k == k003 else kname(k, L), pct(r["accuracy"])]
        row += [pct(r["per_type"][t]["accuracy"]) for t in types]
        row += ["%.4f" % (r["mean_prefill_flops"] / 1e9), "%.1f" % r["prefill_flops_saved_pct"],
                "%.1f" % r["flops_saved_pct"], "%.2e" % r["mean_kl"], "%.2e" % calib["mean_kl"][k],
                "%.1f" % (1000 * r["seconds_per_example"])]
        w("| " + " | ".join(row) + " |")
    w("")
    w("Bold: the K calibrated at eta = %g. " % ETA + "'mean KL (test)': KL(p_vtw || p_full) of the first "
      "answer token over all test questions; 'mean KL (calib.)': the calibration's mean over its "
      "samples (the number the rule uses). Time: single-sequence greedy generation on this CPU "
      "(depends on the machine's load), image encoding excluded (%.1f s for %d images)." % (ev["encode_seconds"], ev["num_images"]))
    w("")
    w("![KL vs K](%s/kl_vs_k.svg)" % rel)
    w("")
    w("![Accuracy vs FLOPs](%s/accuracy_vs_flops.svg)" % rel)
    w("")
    write_whole_request(w, gen, res, ks, L, k003)
    if indep:
        write_independent(w, indep, res, types, ks, L, k003, meta, read_text(work, "eval_independent.cmd"))
    w("## Calibration (\"find K\")")
    w("")
    w("`%s`" % read_text(work, "calib.cmd"))
    w("")
    w("| eta | K (all types) | " + " | ".join(sorted(calib_bt.get("by_type", {}).keys())) + " |")
    w("|" + "---|" * (2 + len(calib_bt.get("by_type", {}))))
    for i, e in enumerate(calib["etas"]):
        row = ["%g" % e, kname(calib["picked"][i]["layer"], L)]
        for t in sorted(calib_bt.get("by_type", {}).keys()):
            row.append(kname(calib_bt["by_type"][t]["picked"][i]["layer"], L))
        w("| " + " | ".join(row) + " |")
    w("")
    w("Per-type columns: task profiles from `vtw calibrate --by-type` (the first %d samples of each "
      "type). With the profiles at eta = %g, the test set gives:" % (calib["num_samples"], ETA))
    w("")
    ei = list(calib["etas"]).index(ETA)
    prof = {t: calib_bt["by_type"][t]["picked"][ei]["layer"] for t in calib_bt.get("by_type", {})}
    n_all = sum(off["per_type"][t]["count"] for t in types)
    corr = sum(res[prof.get(t, k003)]["per_type"][t]["correct"] for t in types)
    fl = sum(res[prof.get(t, k003)]["per_type"][t]["mean_prefill_flops"] * off["per_type"][t]["count"] for t in types)
    fl_off = sum(off["per_type"][t]["mean_prefill_flops"] * off["per_type"][t]["count"] for t in types)
    w("| type | profile K | accuracy % | vs off (points) | prefill saved % |")
    w("|---|---|---|---|---|")
    for t in types:
        k = prof.get(t, k003)
        r = res[k]["per_type"][t]
        w("| %s | %s | %s | %+.1f | %.1f |" % (t, kname(k, L), pct(r["accuracy"]),
                                               100 * (r["accuracy"] - off["per_type"][t]["accuracy"]),
                                               r["prefill_flops_saved_pct"]))
    w("| **all** | | %s | %+.1f | %.1f |" % (pct(corr / n_all), 100 * (corr / n_all - acc_off),
                                              100 * (1 - fl / fl_off) if fl_off else 0))
    w("")
    w("## Attention sink")
    w("")
    w("`%s`" % read_text(work, "study.cmd"))
    w("")
    w("Where the last prompt token (the one whose logits give the answer) puts its attention, per "
      "decoder layer, full model, mean over heads and %d test prompts." % study["num_samples"])
    w("")
    w("| layer | BOS | prefix text | image | question text | itself | per image token | per text token |")
    w("|---|---|---|---|---|---|---|---|")
    for i, l in enumerate(layers):
        w("| %d | %.3f | %.3f | %.3f | %.3f | %.3f | %.4f | %.4f |"
          % (i, l["bos"], l["prefix_text"], l["image"], l["question_text"], l["self"],
             l["image_per_token"], l["text_per_token"]))
    w("")
    w("![Attention mass](%s/attention_sink.svg)" % rel)
    w("")
    w("![Attention per token](%s/attention_per_token.svg)" % rel)
    w("")
    w("## Information migration")
    w("")
    w("What was measured, exactly (all on the test set, greedy, same scoring):")
    w("")
    w("- **withdrawn at K** (`vtw eval --vtw-layer all`): VTW itself; the image tokens leave before "
      "layer K.")
    w("- **blocked in layers < K** (`vtw eval --vtw-layer all --image-mode block`): the paper's "
      "check. The image tokens are present in every layer (computed by the full model), but in "
      "layers < K the text tokens (question and generated tokens) cannot attend to them; from "
      "layer K on they can. Implemented exactly with the KV cache: the rows up to the image are "
      "prefilled once, and the cache the text then uses holds no image entries in layers < K. "
      "Blocked < 0 is the full model and blocked < %d equals withdrawal at K = 0 (both checked in "
      "tests/eval_calibrate_test.cc)." % L)
    w("- **blank image** (`--image-mode blank --vtw-layer off`): the full model with the image "
      "replaced by a same-size image filled with its border's median colour (the background).")
    w("")
    w("If visual information migrates into the text tokens in the early layers, accuracy with "
      "withdrawal at K stays high while blocking in the first K layers (and allowing attention "
      "afterwards) destroys it, since the image is then available only where the model no longer "
      "reads it.")
    w("")
    w("| K | withdrawn at K: acc % | blocked in layers < K: acc % |")
    w("|---|---|---|")
    for k in ks:
        w("| %d | %s | %s |" % (k, pct(res[k]["accuracy"]), pct(bres[k]["accuracy"])))
    w("")
    w("Full model %s%%; blank image %s%%. Per type, blocked in layers < K:" % (pct(acc_off), pct(blank_acc)))
    w("")
    w("| K | " + " | ".join(types) + " |")
    w("|" + "---|" * (1 + len(types)))
    for k in ks:
        w("| %d | %s |" % (k, " | ".join(pct(bres[k]["per_type"][t]["accuracy"]) for t in types)))
    w("")
    w("![Information migration](%s/information_migration.svg)" % rel)
    w("")
    w("## Reproduce")
    w("")
    w("```")
    binary = meta.get("binary", "build/vtw")
    w("cmake --build %s --target vtw && scripts/vtw-report.sh %s%s"
      % (os.path.dirname(binary) or ".", meta["model"],
         "" if binary == "build/vtw" else " --bin " + binary))
    w("```")
    w("")
    w("Commands run (times in seconds on this machine):")
    w("")
    w("```")
    for name in ("eval_withdraw", "eval_block", "eval_blank", "calib", "calib_by_type", "study"):
        w("%s    # %s s" % (read_text(work, name + ".cmd"), read_text(work, name + ".seconds", "?")))
    w("```")
    with open(args.out, "w") as f:
        f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
