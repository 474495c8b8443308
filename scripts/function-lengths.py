#!/usr/bin/env python3
"""Lists the longest function bodies in C++ sources (a review aid, not a test).

A function is a line at namespace level (column 0, not a comment, preprocessor line or
declaration) that opens a brace; its length runs to the matching closing brace at column 0.
Usage: scripts/function-lengths.py [--min N] DIR...   (default: model vtw server, N = 60)
"""
import pathlib
import re
import sys

SKIP = re.compile(r"^(namespace|class|struct|enum|union|extern|template\s*<[^>]*>\s*(class|struct))\b")


def functions(path):
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line and not line[0].isspace() and not line.startswith(("//", "#", "}")) \
                and not SKIP.match(line):
            # The signature may span lines; find its opening brace.
            j = i
            while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
                j += 1
            if j < len(lines) and "{" in lines[j] and not lines[j].rstrip().endswith("};"):
                if lines[j].rstrip().endswith("}"):  # one-line body
                    i = j + 1
                    continue
                k = j + 1
                while k < len(lines) and not lines[k].startswith("}"):
                    k += 1
                name = re.sub(r"\s+", " ", " ".join(l.strip() for l in lines[i:j + 1]))
                name = name.split("(")[0].split()[-1] if "(" in name else name[:60]
                yield name, i + 1, k - i + 1
                i = k + 1
                continue
        i += 1


def main(argv):
    minimum = 60
    if len(argv) > 1 and argv[0] == "--min":
        minimum, argv = int(argv[1]), argv[2:]
    dirs = argv or ["model", "vtw", "server"]
    rows = []
    for d in dirs:
        for path in sorted(pathlib.Path(d).glob("*.cc")):
            for name, line, n in functions(path):
                rows.append((n, f"{path}:{line}", name))
    for n, where, name in sorted(rows, reverse=True):
        if n >= minimum:
            print(f"{n:5d}  {where:40s} {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
