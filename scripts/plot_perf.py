#!/usr/bin/env python3
"""Plots of the server load benchmark (scripts/bench-load.sh): latency and throughput vs load,
with VTW off, at the calibrated K and with a per-request K mix. Python 3 standard library only
(the SVG line charts come from scripts/plot_report.py).

  plot_perf.py DIR      # reads DIR/load-*.json, writes DIR/<label>-latency.svg, -itl.svg, -throughput.svg
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_report import COLORS, line_chart  # noqa: E402

MODE_NAMES = {"off": "VTW off", "default": "calibrated K", "mix": "per-request K mix"}


def mode_label(mode, model):
    if mode == "default":
        return "calibrated K=%d" % model["default_k"]
    return MODE_NAMES.get(mode, "K=" + mode)


def upto(series):
    """y range from 0 to a little above the largest value."""
    top = max((y for s in series for y in s["ys"] if y is not None), default=1)
    return (0, top * 1.08 or 1)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "docs/perf"
    for path in sorted(glob.glob(os.path.join(out_dir, "load-*.json"))):
        data = json.load(open(path))
        label = data["options"].get("label") or os.path.basename(path)[5:-5]
        model = data["model"]
        phases = data.get("phases", [])
        modes = []
        for p in phases:
            if p["mode"] not in modes:
                modes.append(p["mode"])
        clients = sorted({p["clients"] for p in phases})
        if len(clients) < 2:
            continue  # not a load sweep
        title_model = "%s (%s, %d layers)" % (model["name"], model["dtype"], model["layers"])
        ttft, itl, thr = [], [], []
        for i, mode in enumerate(modes):
            ps = sorted((p for p in phases if p["mode"] == mode), key=lambda p: p["clients"])
            xs = [p["clients"] for p in ps]
            color = COLORS[i % len(COLORS)]
            name = mode_label(mode, model)
            ttft.append({"name": name + " p50", "xs": xs, "ys": [1e3 * p["ttft_p50"] for p in ps],
                         "color": color})
            ttft.append({"name": name + " p95", "xs": xs, "ys": [1e3 * p["ttft_p95"] for p in ps],
                         "color": color, "dash": True})
            itl.append({"name": name + " p50", "xs": xs, "ys": [1e3 * p["itl_p50"] for p in ps],
                        "color": color})
            itl.append({"name": name + " p95", "xs": xs, "ys": [1e3 * p["itl_p95"] for p in ps],
                        "color": color, "dash": True})
            thr.append({"name": name, "xs": xs, "ys": [p["requests_per_s"] for p in ps],
                        "color": color})
        xticks = [(c, str(c)) for c in clients]
        note = "%d new tokens per request, %g s per load level" % (
            data["options"]["max_new_tokens"], data["options"]["seconds"])
        line_chart(os.path.join(out_dir, label + "-latency.svg"),
                   "Time to first token vs load: " + title_model, "concurrent streaming clients",
                   "TTFT (ms)", ttft, xticks=xticks, ylim=upto(ttft), note=note)
        line_chart(os.path.join(out_dir, label + "-itl.svg"),
                   "Inter-token latency vs load: " + title_model, "concurrent streaming clients",
                   "ITL (ms)", itl, xticks=xticks, ylim=upto(itl), note=note)
        line_chart(os.path.join(out_dir, label + "-throughput.svg"),
                   "Throughput vs load: " + title_model, "concurrent streaming clients",
                   "requests/s", thr, xticks=xticks, ylim=upto(thr), note=note)
        print("wrote %s/%s-{latency,itl,throughput}.svg" % (out_dir, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
