#!/usr/bin/env python3
"""Writes the seed corpus fuzz/corpus/<target>/ from tests/data (deterministic; run from anywhere).

Needs python3 and protoc (Debian protobuf-compiler, for the serialized GenerateRequests). The
JPEG, WebP and BMP seeds of the image target (image/*.jpg.seed etc.) are not written here: they
were encoded once from tests/data/oracle/images with OpenCV's cv::imencode (JPEG quality 90 and
a progressive one, WebP lossy 80 and lossless) and are kept as files; this script leaves them
alone. Every seed stays under its target's -max_len (fuzz/fuzz_targets.cc) and the corpus under
1 MB in all.
"""
import json
import os
import pathlib
import struct
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORACLE = ROOT / "tests" / "data" / "oracle"
MODEL = ORACLE / "tiny-llava"
OUT = ROOT / "fuzz" / "corpus"


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def safetensors(entries, metadata=None, pad=True):
    """entries: list of (name, dtype, shape, bytes) -> a safetensors file image."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"))
    if pad:
        text += " " * (-len(text) % 8)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(e[3] for e in entries)


def safetensors_seeds():
    blob = (MODEL / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    small = sorted(
        (k for k in header if k != "__metadata__"),
        key=lambda k: (header[k]["data_offsets"][1] - header[k]["data_offsets"][0], k),
    )
    real = []
    for k in small[:3]:
        b, e = header[k]["data_offsets"]
        real.append((k, header[k]["dtype"], header[k]["shape"], data[b:e]))
    write("safetensors", "oracle_three_tensors.safetensors", safetensors(real, {"format": "pt"}))
    f16 = struct.pack("<4H", 0x3C00, 0x8001, 0x7C00, 0x7E00)  # 1, -subnormal, inf, nan
    bf16 = struct.pack("<3H", 0x3F80, 0xFF80, 0x0001)
    write(
        "safetensors",
        "dtypes.safetensors",
        safetensors(
            [
                ("h", "F16", [2, 2], f16),
                ("b", "BF16", [3], bf16),
                ("i", "I64", [1], struct.pack("<q", -5)),
                ("m", "BOOL", [2], b"\x01\x00"),
                ("u", "U8", [1, 1, 3], b"abc"),
                ("d", "F64", [], struct.pack("<d", 2.5)),
            ],
            {"k": "v", "format": "pt"},
        ),
    )
    write(
        "safetensors",
        "empty_and_scalar.safetensors",
        safetensors([("e", "F32", [0, 4], b""), ("s", "F32", [], struct.pack("<f", 1.0))],
                    pad=False),
    )
    write("safetensors", "no_tensors.safetensors", safetensors([], {}))
    # The oracle's whole header with the data section cut off: a real header, rejected late.
    write("safetensors", "oracle_header_truncated.safetensors", blob[: 8 + n + 64])


def shard_index_seeds():
    index = {
        "metadata": {"total_size": 1601536},
        "weight_map": {
            "language_model.lm_head.weight": "model-00002-of-00002.safetensors",
            "language_model.model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "vision_tower.vision_model.post_layernorm.bias": "model-00001-of-00002.safetensors",
        },
    }
    write("shard_index", "two_shards.json", json.dumps(index, indent=2))
    write("shard_index", "one_entry.json", '{"weight_map":{"w":"a.safetensors"}}')
    write("shard_index", "bad_shard.json", '{"weight_map":{"w":"../x.safetensors"}}')


def config_seeds():
    write("llava_config", "oracle_config.json", (MODEL / "config.json").read_bytes())
    shipped = ROOT / "models" / "vtw-shapes" / "config.json"
    if shipped.exists():
        write("llava_config", "shipped_config.json", shipped.read_bytes())
    write("llava_config", "minimal.json", '{"model_type":"llava"}')
    write(
        "llava_config",
        "small_full.json",
        json.dumps({
            "model_type": "llava", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full", "image_token_index": 7,
            "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                              "hidden_act": "gelu"},
            "text_config": {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "tie_word_embeddings": True},
        }),
    )


def image_seeds():
    for i, png in enumerate(sorted((ORACLE / "images").glob("*.png"))):
        # The first byte picks the preprocessing configuration (4 of them).
        write("image", png.stem + ".png.seed", bytes([i % 4]) + png.read_bytes())
    # A 3x2 24-bit BMP, bottom-up, rows padded to 4 bytes.
    rows = b"".join(bytes([0, 0, 255, 0, 255, 0, 255, 0, 0]) + b"\0\0\0" for _ in range(2))
    dib = struct.pack("<IiiHHIIiiII", 40, 3, 2, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
    bmp = b"BM" + struct.pack("<IHHI", 14 + 40 + len(rows), 0, 0, 14 + 40) + dib + rows
    write("image", "tiny_3x2.bmp.seed", b"\x00" + bmp)


def tokenizer_seeds():
    prompts = [
        "What color is the circle?",
        "USER: <image>\nHow many squares are there? ASSISTANT:",
        "  leading spaces, trailing  ",
        "caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \U0001F600 <s></s><pad><unk>",
        "\u2581already\u2581escaped \n\t\r",
        "a" * 300,
    ]
    for i, p in enumerate(prompts):
        write("tokenizer", f"prompt_{i}.txt", bytes([i % 8]) + p.encode())
    write("tokenizer", "invalid_utf8.bin", b"\x03\xff\xfe\xc3(\xe2\x82\xf0\x9f\x98")
    write("tokenizer", "ids.bin", b"\x04" + struct.pack("<12h", 1, 5, 400, 401, 2, 0, -1, 402,
                                                      3, 259, 300, 32767))
    write("tokenizer_model", "oracle_tokenizer.model", (MODEL / "tokenizer.model").read_bytes())


def request_seeds():
    proto = ROOT / "proto" / "vtw" / "v1" / "inference.proto"
    png = (ORACLE / "images" / "red_circle.png").read_bytes()
    tall = (ORACLE / "images" / "tall_37x91_orange_circle_purple_square.png").read_bytes()

    def octal(b):
        return "".join("\\%03o" % c for c in b)

    texts = {
        "text_only": 'prompt: "What color is the circle?"',
        "image_greedy": f'image: "{octal(png)}" prompt: "What color is the circle?" '
                        'sampling { max_new_tokens: 8 }',
        "image_sampling": f'request_id: "r-1" image: "{octal(tall)}" prompt: "Describe it." '
                          'sampling { max_new_tokens: 4 temperature: 0.7 top_p: 0.9 top_k: 5 '
                          'seed: 42 stop: "." stop: "\\n" ignore_eos: true } '
                          'vtw { mode: VTW_MODE_LAYER layer: 2 }',
        "vtw_off": 'prompt: "Hi" vtw { mode: VTW_MODE_OFF }',
        "vtw_profile": 'prompt: "Hi" vtw { mode: VTW_MODE_PROFILE profile: "count" }',
        "image_in_prompt": 'prompt: "<image> what?" sampling { max_new_tokens: 0 }',
    }
    for name, text in texts.items():
        out = subprocess.run(
            ["protoc", f"--proto_path={ROOT / 'proto'}", "--encode=vtw.v1.GenerateRequest",
             str(proto)],
            input=text.encode(), capture_output=True, check=True).stdout
        write("request", name + ".pb", out)


def main():
    safetensors_seeds()
    shard_index_seeds()
    config_seeds()
    image_seeds()
    tokenizer_seeds()
    request_seeds()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"corpus: {total} bytes in {OUT}", file=sys.stderr)
    return 0 if total < 1 << 20 else 1


if __name__ == "__main__":
    sys.exit(main())
