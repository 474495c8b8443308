#!/usr/bin/env python3
"""An HTTP client for the tests of vtw-server's OpenAI-compatible front, on Python's standard
library only (urllib.request for plain requests, http.client for streams and disconnects), as a
user without any SDK would call it. Prints one JSON object per request on stdout:

  {"status": 200, "headers": {...}, "json": <body as JSON or null>, "body": "<text>",
   "events": [<each SSE data: object>], "done": <saw data: [DONE]>}

Usage:
  http_client.py URL [--method GET|POST] [--body FILE] [--token T] [--stream]
                 [--disconnect-after-events N] [--disconnect-after-seconds S]
                 [--concurrent N] [--timeout S]

--disconnect-after-events N: read N stream events, then close the connection (a client that
goes away mid-stream). --disconnect-after-seconds S: send the request, wait S seconds, close
without reading (a unary client that gives up). --concurrent N: N identical requests at once
(threads); prints a JSON list of N results in request order.
"""
import argparse
import http.client
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def headers_for(args):
    h = {"Content-Type": "application/json"}
    if args.token is not None:
        h["Authorization"] = "Bearer " + args.token
    return h


def result(status, headers, body, events=None, done=False):
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    return {"status": status, "headers": {k.lower(): v for k, v in headers},
            "json": parsed, "body": text, "events": events or [], "done": done}


def plain(args, body):
    req = urllib.request.Request(args.url, data=body, method=args.method, headers=headers_for(args))
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return result(resp.status, resp.getheaders(), resp.read())
    except urllib.error.HTTPError as e:
        return result(e.code, e.headers.items(), e.read())


def connection(url, timeout):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    path = u.path + ("?" + u.query if u.query else "")
    return conn, path


def stream(args, body):
    conn, path = connection(args.url, args.timeout)
    conn.request(args.method, path, body=body, headers=headers_for(args))
    resp = conn.getresponse()
    if resp.status != 200 or not resp.getheader("Content-Type", "").startswith("text/event-stream"):
        return result(resp.status, resp.getheaders(), resp.read())
    events, done = [], False
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
        if args.disconnect_after_events and len(events) >= args.disconnect_after_events:
            # Go away abruptly, as a killed client would.
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.sock.close()
            break
    r = result(resp.status, resp.getheaders(), b"", events, done)
    conn.close()
    return r


def give_up(args, body):
    conn, path = connection(args.url, args.timeout)
    conn.request(args.method, path, body=body, headers=headers_for(args))
    time.sleep(args.disconnect_after_seconds)
    conn.sock.close()
    return result(0, [], b"")


def one(args, body):
    if args.disconnect_after_seconds:
        return give_up(args, body)
    if args.stream:
        return stream(args, body)
    return plain(args, body)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--method", default=None)
    p.add_argument("--body")
    p.add_argument("--token")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--disconnect-after-events", type=int, default=0)
    p.add_argument("--disconnect-after-seconds", type=float, default=0)
    p.add_argument("--concurrent", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    body = open(args.body, "rb").read() if args.body else None
    if args.method is None:
        args.method = "POST" if body is not None else "GET"
    if not args.concurrent:
        json.dump(one(args, body), sys.stdout)
        return
    results = [None] * args.concurrent

    def run(i):
        try:
            results[i] = one(args, body)
        except Exception as e:  # reported, not raised: the test sees which one failed
            results[i] = {"status": -1, "error": repr(e)}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
