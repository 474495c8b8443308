#!/usr/bin/python3
"""Writes an independent evaluation set for the shapes task, drawn with cairo (python3-cairo).

`vtw dataset` draws its scenes with OpenCV (filled polygons and circles, LINE_8 or LINE_AA, light
flat backgrounds, Gaussian noise, JPEG). This script draws the same kind of scenes with a
different library and style, so accuracy on it says how the model does on images it was never
drawn from: cairo's own antialiasing (none / gray / best, per image), outlines (a darker shade of
the fill, or near-black) with line widths of 1-4 px and round or mitre joins, hollow-looking thin
rims, gradient and two-tone backgrounds, image sizes 56-256 px, shapes of 14-38% of the crop,
rotations up to 25 degrees, regular and irregular triangles. The questions are the training
generator's six templates with the same answer words (shapes/shapes_dataset.h AllQuestions) and
the same validity rules (a colour question only when exactly one shape of that kind is present,
a side question only for a unique colour+shape at least 0.15 crop sides off the centre line, ...).
Everything visual lies inside the centred square crop that the image processor keeps.

Never train on it: nothing in `vtw dataset` / `vtw train` reads it.

Deterministic: the same --seed and --count give byte-identical files (Python's Mersenne Twister
seeded per image; cairo's PNG output is deterministic for equal drawing calls).

  /usr/bin/python3 scripts/make-independent-eval.py --out DIR [--count 900] [--seed 11]
      [--questions-per-image 3] [--split independent]

Writes DIR/images/<split>_NNNNNN.png and DIR/<split>.jsonl, one
{"image", "question", "answer", "type"} object per line (image relative to DIR), the format
`vtw eval --data` reads. Progress goes to stderr.
"""

import argparse
import json
import math
import os
import random
import sys

try:
    import cairo
except ImportError:
    sys.exit("error: python3-cairo is not installed (apt-get install python3-cairo); "
             "run this script with Debian's /usr/bin/python3")

KINDS = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
# The same colour names as the training generator, drawn at its base RGB with a smaller shade
# jitter (+-12%): the question is the renderer, not new colour boundaries.
BASE_RGB = {
    "red": (215, 35, 35), "green": (40, 165, 55), "blue": (35, 75, 215),
    "yellow": (235, 215, 35), "purple": (135, 45, 185), "orange": (240, 120, 25),
}
SHADE_JITTER = 0.12
SIDE_MIN_OFFSET = 0.15  # shapes/shapes_dataset.h kSideMinOffset
TYPES = ["color", "shape", "count_shape", "count_all", "exists", "side"]
ANTIALIAS = [cairo.ANTIALIAS_NONE, cairo.ANTIALIAS_GRAY, cairo.ANTIALIAS_BEST]


def jitter(rng, rgb, amount=SHADE_JITTER):
    return tuple(min(255, max(0, round(c * rng.uniform(1 - amount, 1 + amount)))) for c in rgb)


def radius(shape):
    """Bounding-circle radius of a shape, including its outline."""
    r = shape["size"] / 2 if shape["kind"] == "circle" else max(
        math.hypot(x - shape["cx"], y - shape["cy"]) for x, y in vertices(shape))
    return r + shape["line_width"] / 2 + 1.0


def vertices(shape):
    w = shape["size"]
    if shape["kind"] == "square":
        local = [(-w / 2, -w / 2), (w / 2, -w / 2), (w / 2, w / 2), (-w / 2, w / 2)]
    else:  # triangle, centroid at the origin
        h = w * shape["aspect"]
        ax = shape["skew"] * w
        c = ax / 3
        local = [(ax - c, -2 * h / 3), (w / 2 - c, h / 3), (-w / 2 - c, h / 3)]
    a = math.radians(shape["angle"])
    ca, sa = math.cos(a), math.sin(a)
    return [(shape["cx"] + ca * x - sa * y, shape["cy"] + sa * x + ca * y) for x, y in local]


def random_scene(rng):
    side = rng.randint(56, 256)
    if rng.random() < 0.6:
        width = height = side
    else:
        long_side = min(256, round(side * rng.uniform(1.05, 1.4)))
        width, height = (long_side, side) if rng.random() < 0.5 else (side, long_side)
    crop = min(width, height)
    x0, y0 = (width - crop) / 2, (height - crop) / 2

    # Backgrounds: flat light, white, a light linear gradient, or two light tones split.
    kind = rng.choice(["flat", "white", "gradient", "two_tone"])
    def light():
        g = rng.randint(200, 250)
        return tuple(min(255, max(190, g + rng.randint(-12, 12))) for _ in range(3))
    background = {"kind": kind, "a": light(), "b": light(), "angle": rng.uniform(0, math.pi)}
    if kind == "white":
        background["a"] = (255, 255, 255)

    n = rng.randint(1, 4)
    dominant = rng.choice(KINDS)
    same_kind = rng.random() < 0.25
    style = {
        "antialias": rng.choice(ANTIALIAS),
        # outline: none, darker shade of the fill, or near-black
        "outline": rng.choice(["none", "none", "darker", "dark"]),
        "line_width": rng.uniform(1.0, 4.0) * max(1.0, crop / 128),
        "join": rng.choice([cairo.LINE_JOIN_MITER, cairo.LINE_JOIN_ROUND, cairo.LINE_JOIN_BEVEL]),
    }
    shapes = []
    for i in range(n):
        k = dominant if same_kind or rng.random() < 0.5 else rng.choice(KINDS)
        c = rng.choice([s["color"] for s in shapes]) if shapes and rng.random() < 0.25 else rng.choice(COLORS)
        shapes.append({"kind": k, "color": c, "rgb": jitter(rng, BASE_RGB[c]),
                       "line_width": style["line_width"] if style["outline"] != "none" else 0.0})

    crowd = 1.0 if n <= 2 else (0.9 if n == 3 else 0.8)
    lo, hi = 0.14, 0.38 * crowd
    margin, gap = max(2.0, 0.04 * crop), max(3.0, 0.03 * crop)
    for attempt in range(200):
        placed = []
        ok = True
        for s in shapes:
            s["size"] = crop * rng.uniform(lo, hi)
            s["angle"] = rng.uniform(-25, 25) if s["kind"] != "circle" and rng.random() < 0.5 else 0.0
            s["aspect"] = rng.uniform(0.75, 1.1)
            s["skew"] = rng.uniform(-0.2, 0.2)
            if s["kind"] == "triangle":
                s["size"] *= 1.15
            if style["outline"] != "none":  # an outline stays a rim: at most 12% of the size
                s["line_width"] = min(style["line_width"], 0.12 * s["size"])
            s["cx"], s["cy"] = 0.0, 0.0
            r = radius(s)
            lx, hx = x0 + margin + r, x0 + crop - margin - r
            ly, hy = y0 + margin + r, y0 + crop - margin - r
            if lx > hx or ly > hy:
                ok = False
                break
            for _ in range(100):
                s["cx"], s["cy"] = rng.uniform(lx, hx), rng.uniform(ly, hy)
                if all(math.hypot(s["cx"] - o["cx"], s["cy"] - o["cy"]) >= radius(s) + radius(o) + gap
                       for o in placed):
                    break
            else:
                ok = False
                break
            placed.append(s)
        if ok:
            break
        hi = max(lo, lo + (hi - lo) * 0.9)
        if attempt > 100 and len(shapes) > 1:
            shapes.pop()
    return {"width": width, "height": height, "crop": crop, "x0": x0, "y0": y0,
            "background": background, "style": style, "shapes": shapes}


def rgb01(rgb):
    return tuple(c / 255.0 for c in rgb)


def render(scene, path):
    w, h = scene["width"], scene["height"]
    surface = cairo.ImageSurface(cairo.FORMAT_RGB24, w, h)
    ctx = cairo.Context(surface)
    bg = scene["background"]
    if bg["kind"] == "gradient":
        dx, dy = math.cos(bg["angle"]) * w / 2, math.sin(bg["angle"]) * h / 2
        grad = cairo.LinearGradient(w / 2 - dx, h / 2 - dy, w / 2 + dx, h / 2 + dy)
        grad.add_color_stop_rgb(0, *rgb01(bg["a"]))
        grad.add_color_stop_rgb(1, *rgb01(bg["b"]))
        ctx.set_source(grad)
        ctx.paint()
    elif bg["kind"] == "two_tone":
        ctx.set_source_rgb(*rgb01(bg["a"]))
        ctx.paint()
        ctx.set_source_rgb(*rgb01(bg["b"]))
        ctx.move_to(0, 0)
        ctx.line_to(w, 0)
        ctx.line_to(0, h)
        ctx.close_path()
        ctx.fill()
    else:
        ctx.set_source_rgb(*rgb01(bg["a"]))
        ctx.paint()
    st = scene["style"]
    ctx.set_antialias(st["antialias"])
    ctx.set_line_join(st["join"])
    for s in scene["shapes"]:
        if s["kind"] == "circle":
            ctx.new_path()
            ctx.arc(s["cx"], s["cy"], s["size"] / 2, 0, 2 * math.pi)
        else:
            pts = vertices(s)
            ctx.move_to(*pts[0])
            for p in pts[1:]:
                ctx.line_to(*p)
            ctx.close_path()
        ctx.set_source_rgb(*rgb01(s["rgb"]))
        if st["outline"] == "none":
            ctx.fill()
            continue
        ctx.fill_preserve()
        if st["outline"] == "darker":
            ctx.set_source_rgb(*rgb01(tuple(round(c * 0.6) for c in s["rgb"])))
        else:
            ctx.set_source_rgb(0.12, 0.12, 0.12)
        ctx.set_line_width(st["line_width"])
        ctx.stroke()
    surface.write_to_png(path)


def all_questions(scene):
    """Every valid (question, answer, type) about the scene, as AllQuestions defines them."""
    shapes = scene["shapes"]
    out = []
    kinds = [s["kind"] for s in shapes]
    colors = [s["color"] for s in shapes]
    for k in KINDS:
        if kinds.count(k) == 1:
            out.append(("What color is the %s?" % k, colors[kinds.index(k)], "color"))
    for c in COLORS:
        if colors.count(c) == 1:
            out.append(("What shape is the %s object?" % c, kinds[colors.index(c)], "shape"))
    for k in KINDS:
        out.append(("How many %ss are there?" % k, str(kinds.count(k)), "count_shape"))
    out.append(("How many shapes are there?", str(len(shapes)), "count_all"))
    combos = [(s["color"], s["kind"]) for s in shapes]
    for c in COLORS:
        for k in KINDS:
            out.append(("Is there a %s %s?" % (c, k), "yes" if (c, k) in combos else "no", "exists"))
    center = scene["x0"] + scene["crop"] / 2
    for s in shapes:
        if combos.count((s["color"], s["kind"])) != 1:
            continue
        off = s["cx"] - center
        if abs(off) >= SIDE_MIN_OFFSET * scene["crop"]:
            out.append(("Which side is the %s %s on?" % (s["color"], s["kind"]),
                        "left" if off < 0 else "right", "side"))
    return out


def pick(rng, questions, n, counts, scene):
    """Up to n questions of distinct types where possible, the least-used answer of each type."""
    by_type = {}
    for q in questions:
        by_type.setdefault(q[2], []).append(q)
    present_colors = {s["color"] for s in scene["shapes"]}
    present_kinds = {s["kind"] for s in scene["shapes"]}
    types = sorted(by_type, key=lambda t: (sum(counts.get(t, {}).values()), rng.random()))
    chosen = []
    for t in types[:n]:
        cands = by_type[t]
        def score(q):
            hard = t == "exists" and q[1] == "no" and (
                q[0].split()[3] in present_colors or q[0].split()[4].rstrip("?") in present_kinds)
            return (counts.get(t, {}).get(q[1], 0), 0 if hard else 1, rng.random())
        q = min(cands, key=score)
        counts.setdefault(t, {})[q[1]] = counts.setdefault(t, {}).get(q[1], 0) + 1
        chosen.append(q)
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--count", type=int, default=900, help="number of questions (default 900)")
    ap.add_argument("--seed", type=int, default=11, help="seed (default 11)")
    ap.add_argument("--questions-per-image", type=int, default=3)
    ap.add_argument("--split", default="independent", help="file name prefix (default independent)")
    args = ap.parse_args()
    if args.count < 1 or not 1 <= args.questions_per_image <= 6:
        ap.error("--count must be >= 1 and --questions-per-image 1..6")
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    counts = {}
    lines = []
    index = 0
    while len(lines) < args.count:
        rng = random.Random(args.seed * 1_000_003 + index)
        scene = random_scene(rng)
        rel = "images/%s_%06d.png" % (args.split, index)
        render(scene, os.path.join(args.out, rel))
        for q, a, t in pick(rng, all_questions(scene), args.questions_per_image, counts, scene):
            if len(lines) < args.count:
                lines.append(json.dumps({"image": rel, "question": q, "answer": a, "type": t}))
        index += 1
        if index % 100 == 0:
            print("[make-independent-eval] %d images, %d questions" % (index, len(lines)),
                  file=sys.stderr)
    path = os.path.join(args.out, args.split + ".jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    per_type = {}
    for line in lines:
        t = json.loads(line)["type"]
        per_type[t] = per_type.get(t, 0) + 1
    print("[make-independent-eval] wrote %s: %d questions on %d images (%s)" % (
        path, len(lines), index, ", ".join("%s %d" % kv for kv in sorted(per_type.items()))),
        file=sys.stderr)


if __name__ == "__main__":
    main()
