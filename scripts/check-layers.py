#!/usr/bin/env python3
"""Checks that #include directives keep the layers of vtw-serve (run by ctest as `layering`).

    model <- vtw <- server <- (cli, train, eval);  shapes (the dataset) needs only model.

Inside server/ the engine side (library vtw_serving) must not reach the network side
(vtw_service: gRPC, TLS, HTTP) nor any gRPC header; eval/ links vtw_serving only.
Prints every violation as FILE:LINE: message and exits 1 if there is one.
Usage: scripts/check-layers.py [SOURCE_DIR]
"""
import pathlib
import re
import sys

# Directory -> the project directories its files may include.
ALLOWED = {
    "model": {"model"},
    "vtw": {"model", "vtw"},
    "server": {"model", "vtw", "server", "proto"},
    "shapes": {"model", "shapes"},
    "train": {"model", "vtw", "shapes", "train"},
    "eval": {"model", "vtw", "server", "eval"},
    "cli": {"model", "vtw", "server", "proto", "shapes", "train", "eval", "cli"},
}
# The engine side of server/ (vtw_serving in CMakeLists.txt).
SERVING = {"accounting", "engine", "generator", "image_cache", "metrics", "model_bundle",
           "request", "scheduler"}
# System headers that only the network side may use.
NETWORK_SYSTEM = re.compile(r"^(grpc|grpcpp|google/protobuf)/")
# Project headers of the network side of server/.
SERVICE_HEADERS = {"server/http_util.h", "server/intake.h", "server/log_format.h",
                   "server/metrics_http.h", "server/openai_api.h", "server/openai_http.h",
                   "server/security.h", "server/service.h", "server/validation.h"}
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def layer_of(include):
    """The project directory an include path names ("proto" for generated vtw/v1/...)."""
    if include.startswith("vtw/v1/"):
        return "proto"
    head = include.split("/", 1)[0]
    return head if head in ALLOWED else None


def check(root):
    errors = []
    for directory, allowed in ALLOWED.items():
        for path in sorted((root / directory).glob("*")):
            if path.suffix not in (".h", ".cc"):
                continue
            serving = directory == "server" and path.stem in SERVING
            for number, line in enumerate(path.read_text().splitlines(), 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                kind, inc = m.groups()
                where = f"{path.relative_to(root)}:{number}"
                if kind == "<":
                    if NETWORK_SYSTEM.match(inc) and (directory not in ("server", "cli") or serving):
                        errors.append(f"{where}: <{inc}> is a network header; {directory}/"
                                      f"{'' if not serving else path.name + ' (vtw_serving)'} "
                                      "must not use gRPC/protobuf")
                    continue
                target = layer_of(inc)
                if target is None:
                    continue  # tests/, bench/, fuzz/ helpers are never included from here
                if target not in allowed:
                    errors.append(f"{where}: {directory}/ must not include \"{inc}\" "
                                  f"({target}/ is above it: model <- vtw <- server <- "
                                  "(cli, train, eval))")
                elif (serving or directory == "eval") and (target == "proto" or
                                                           inc in SERVICE_HEADERS):
                    errors.append(f"{where}: \"{inc}\" is the network side of server/ "
                                  "(vtw_service); the engine side and eval/ must not include it")
    return errors


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                        pathlib.Path(__file__).resolve().parent.parent)
    missing = [d for d in ALLOWED if not (root / d).is_dir()]
    if missing:
        print(f"check-layers: missing directories under {root}: {', '.join(missing)}")
        return 1
    errors = check(root)
    for e in errors:
        print(e)
    print(f"check-layers: {len(errors)} violation(s)" if errors else "check-layers: layers kept")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
