#!/usr/bin/env python3
"""A small Python client for vtw-serve (vtw.v1.InferenceService).

Checks the server's health, sends one image and one prompt, and prints the answer; the VTW
statistics (withdrawal layer K, FLOPs and KV cache saved, timings) go to stderr. Needs only
Debian's python3-grpcio and python3-protobuf; the stubs come from generate_stubs.sh (run on first
use into gen/ next to this file).

    python3 client.py --addr localhost:50051 --image cat.png --prompt "What is in the image?"
    python3 client.py --addr localhost:50051 --image cat.png --prompt "..." --stream --vtw-layer off

Exit status: 0 on success, 1 when an RPC fails ("error: <CODE_NAME>: <message>" on stderr) or the
server is not SERVING, 2 for bad arguments.
"""
import argparse
import json
import os
import subprocess
import sys

import grpc
from google.protobuf import json_format

HERE = os.path.dirname(os.path.abspath(__file__))


def load_stubs(stubs_dir):
    """Imports the generated modules from stubs_dir, generating them first if needed."""
    if not os.path.exists(os.path.join(stubs_dir, "vtw", "v1", "inference_pb2_grpc.py")):
        subprocess.run(["bash", os.path.join(HERE, "generate_stubs.sh"), stubs_dir], check=True,
                       env=dict(os.environ, PYTHON=sys.executable))
    sys.path.insert(0, stubs_dir)
    global inference_pb2, inference_pb2_grpc, health_pb2, health_pb2_grpc
    from vtw.v1 import inference_pb2, inference_pb2_grpc
    try:  # the grpcio-health-checking package, where installed
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:  # otherwise the stubs generated from health.proto
        import health_pb2, health_pb2_grpc


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr", default="localhost:50051", help="server address HOST:PORT")
    p.add_argument("--image", help="image file (PNG, JPEG, WebP, BMP); none: text only")
    p.add_argument("--prompt", required=True,
                   help="the question (the server adds the chat template)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--vtw-layer", default="default",
                   help="withdrawal layer K, 'off', or 'default' (the model's calibrated K)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as one line of JSON")
    p.add_argument("--stubs", default=os.path.join(HERE, "gen"),
                   help="directory of the generated stubs (default: gen/ next to this file)")
    args = p.parse_args()
    if args.vtw_layer not in ("default", "off") and not args.vtw_layer.isdigit():
        p.error("--vtw-layer must be a layer number, 'off' or 'default'")
    return args


def build_request(args):
    request = inference_pb2.GenerateRequest(prompt=args.prompt)
    if args.image:
        with open(args.image, "rb") as f:
            request.image = f.read()
    if args.max_new_tokens is not None:
        request.sampling.max_new_tokens = args.max_new_tokens
    if args.vtw_layer == "off":
        request.vtw.mode = inference_pb2.VTW_MODE_OFF
    elif args.vtw_layer.isdigit():
        request.vtw.mode = inference_pb2.VTW_MODE_LAYER
        request.vtw.layer = int(args.vtw_layer)
    return request


def generate_stream(stub, request, timeout, echo):
    """GenerateStream, folded into one GenerateResponse: the deltas' text and token ids joined,
    with finish_reason, usage, vtw and timing from the final message."""
    response = inference_pb2.GenerateResponse()
    for message in stub.GenerateStream(request, timeout=timeout):
        if message.request_id:
            response.request_id = message.request_id
        response.text += message.text
        response.token_ids.extend(message.token_ids)
        if echo:
            print(message.text, end="", flush=True)
        if message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            response.finish_reason = message.finish_reason
            response.usage.CopyFrom(message.usage)
            response.vtw.CopyFrom(message.vtw)
            response.timing.CopyFrom(message.timing)
    if echo:
        print()
    return response


def summary(r):
    """One line of VTW statistics, like `vtw client` prints."""
    def saved(done, without):
        return 100.0 * (without - done) / without if without else 0.0
    vtw = f"K={r.vtw.layer}" if r.vtw.applied else "off"
    reason = inference_pb2.FinishReason.Name(r.finish_reason).replace("FINISH_REASON_", "").lower()
    flops_saved = saved(r.vtw.flops, r.vtw.flops_without_vtw)
    kv_saved = saved(r.vtw.kv_cache_bytes, r.vtw.kv_cache_bytes_without_vtw)
    t = r.timing
    return (f"[vtw] {r.request_id}: {r.usage.completion_tokens} tokens ({reason}), "
            f"prompt {r.usage.prompt_tokens} ({r.usage.image_tokens} image), VTW {vtw}, "
            f"{r.vtw.flops / 1e9:.4g} GFLOP ({flops_saved:.1f}% saved), "
            f"KV {r.vtw.kv_cache_bytes / 1024:.1f} KiB ({kv_saved:.1f}% saved), "
            f"queue {t.queue_seconds:.3f} s, TTFT {t.time_to_first_token_seconds:.3f} s, "
            f"total {t.total_seconds:.3f} s")


def main():
    args = parse_args()
    load_stubs(args.stubs)
    try:
        request = build_request(args)
    except OSError as e:
        print(f"error: cannot read --image: {e}", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.addr) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                print(f"error: the server at {args.addr} is {status}", file=sys.stderr)
                return 1
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            if args.stream:
                response = generate_stream(stub, request, args.timeout, echo=not args.json)
            else:
                response = stub.Generate(request, timeout=args.timeout)
                if not args.json:
                    print(response.text)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(
            response, preserving_proto_field_name=True, including_default_value_fields=True)))
    else:
        print(summary(response), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
