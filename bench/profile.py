#!/usr/bin/env python3
"""Summary of a bench/profile.sh run, in Markdown, on stdout.

Reads the folded stacks of each relay: one line per distinct stack, frames from the outermost
to the sampled function separated by ";", then the CPU time sampled there in nanoseconds.
The summary has three tables per run:
- the time by the component of the function sampled. A sample in the standard library, or in a
  function perf names without its crate, counts for the nearest caller that has a component.
- the time inside a few parts of the relay's work, with everything they call.
- the functions with the most time.
"""

import argparse
import json
import re
import sys
from collections import Counter

STANDARD_LIBRARY = "standard library"
# inferno-collapse-perf --all appends this to the names of kernel functions.
KERNEL_MARK = "_[k]"
OTHER = "other"

# Components in the order they are tried: the first pattern that matches the sampled
# function's name decides. The kernel pattern matches KERNEL_MARK.
COMPONENTS = [
    ("kernel: TCP on loopback, system calls, scheduler", r"_\[k\]$"),
    ("memory allocator (mimalloc)", r"^_?mi_|malloc|^free$|^cfree|_rjem_|^__libc_free"),
    ("copies and compares in libc", r"mem(move|cpy|set|cmp)|str(len|cmp)"),
    ("cryptography (AES-GCM, GHASH, HKDF, SHA-256, ML-KEM)",
     r"^<?(aes|aes_gcm|polyval|ghash|universal_hash|sha2|hkdf|hmac|ml_kem|p256|subtle|ctr|cipher)::"),
    ("request records and logging", r"api_relay::telemetry|^<?tracing(_core|_subscriber|_actix_web)?::|zmij|itoa"),
    ("metrics", r"prometheus|api_relay::metrics"),
    ("Redis client (redis, bb8)", r"^<?(redis|bb8|bb8_redis|combine)::"),
    ("relay code", r"^<?api_relay(_protocol|_actors)?::"),
    ("HTTP server (actix-http, actix-web, httparse)", r"^<?(actix_http|actix_web|actix_router|actix_service|httparse)::|httparse"),
    ("HTTP clients (awc to relay B, hyper to the upstream)", r"^<?(awc|hyper|hyper_util|h2)::"),
    ("HTTP types (http)", r"^<?http::"),
    ("actors (actix)", r"^<?actix::"),
    ("async runtime (tokio, actix-rt, actix-server, futures)",
     r"^<?(tokio|tokio_util|actix_rt|actix_server|actix_codec|futures_util|futures_core|futures_channel)::"),
    ("bytes and base64", r"^<?(bytes|base64)::"),
    (STANDARD_LIBRARY, r"^<?(core|alloc|std|hashbrown)::"),
]


# Parts of the relay's work, each counted with everything it calls: a sample counts for a part
# when any frame of its stack matches.
PARTS = [
    # The log writer thread's stacks start with its name.
    ("request records (RequestLog::on_request_end, log writer thread)", r"on_request_end|^api-relay-log"),
    ("sealing and opening (keys, AES-GCM, records)",
     r"api_relay_protocol::(seal|records|keys)|ItemCipher|RecordSealer|RecordOpener|seal_whole|open_padded"),
    ("session actors and registry (api_relay_actors)", r"api_relay_actors::"),
    ("header blocks (api_relay::headers)", r"api_relay::headers::"),
    ("metrics (prometheus)", r"prometheus|api_relay::metrics"),
]


def read_stacks(path):
    """Returns (frames, time) for each line of a folded stacks file."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as folded:
        for line in folded:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks.append((stack.split(";"), int(count)))
    return stacks


def component(function):
    for name, pattern in COMPONENTS:
        if re.search(pattern, function):
            return name
    return OTHER


def stack_component(frames):
    """Returns the component of the sampled function. When the function is in the standard
    library or has no crate path (perf names inlined functions that way), returns the component
    of its nearest caller that has one."""
    first = component(frames[-1])
    if first not in (STANDARD_LIBRARY, OTHER):
        return first
    for frame in reversed(frames[:-1]):
        found = component(frame)
        if found not in (STANDARD_LIBRARY, OTHER):
            return found
    return first


def percent(part, whole):
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wrk", required=True, help="JSON summary that bench/post.lua wrote")
    parser.add_argument("--cpu-ticks", type=int, required=True, help="CPU ticks of both relays during the run")
    parser.add_argument("--clock-ticks", type=int, required=True, help="ticks per second (getconf CLK_TCK)")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--relay", nargs=2, action="append", metavar=("NAME", "FOLDED"), required=True)
    parser.add_argument("--top", type=int, default=15, help="functions listed per relay")
    args = parser.parse_args()

    with open(args.wrk, encoding="utf-8") as summary:
        wrk = json.load(summary)
    requests = wrk["requests"]
    seconds = wrk["duration_us"] / 1e6
    errors = sum(wrk[key] for key in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout"))
    cpu_us = args.cpu_ticks / args.clock_ticks * 1e6 / requests if requests else 0.0

    profiles = [(name, read_stacks(path)) for name, path in args.relay]
    names = [name for name, _ in profiles]
    totals = {name: sum(time for _, time in stacks) for name, stacks in profiles}
    by_component = {name: Counter() for name in names}
    by_part = {name: Counter() for name in names}
    by_function = {name: Counter() for name in names}
    for name, stacks in profiles:
        for frames, time in stacks:
            by_component[name][stack_component(frames)] += time
            by_function[name][frames[-1]] += time
            for part, pattern in PARTS:
                if any(re.search(pattern, frame) for frame in frames):
                    by_part[name][part] += time

    out = sys.stdout
    out.write(f"# Profile of a relay pair, commit {args.commit}\n\n")
    out.write(
        f"1 KB POST through relay A and relay B to the nginx upstream, {args.connections} connections, "
        f"{args.mode} mode: {requests / seconds:,.0f} requests/s, p99 {wrk['latency_us']['p99'] / 1000:.2f} ms, "
        f"{errors} errors, {cpu_us:.1f} µs of CPU per request for both relays together. "
        "perf was sampling during the run, which costs CPU of its own, so throughput is lower and CPU "
        "per request higher than in a bench/RESULTS.md run. Compare them only with profiles taken on "
        "the same machine.\n\n"
    )
    sampled = ", ".join(f"{name} {totals[name] / 1e9:.2f} s" for name in names)
    out.write(
        f"CPU time sampled: {sampled}. The flame graphs beside this file (one SVG per relay) show "
        "the same samples by call stack.\n\n"
    )
    header = "| {} | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    out.write("Share of each relay's CPU time by the component of the function sampled:\n\n")
    out.write(header.format("component"))
    # A fixed order, so that profiles of two runs line up row by row.
    for part in [name for name, _ in COMPONENTS] + [OTHER]:
        cells = " | ".join(percent(by_component[name][part], totals[name]) for name in names)
        out.write(f"| {part} | {cells} |\n")

    out.write("\nShare of each relay's CPU time inside parts of its work, with what they call:\n\n")
    out.write(header.format("part"))
    for part, _ in PARTS:
        cells = " | ".join(percent(by_part[name][part], totals[name]) for name in names)
        out.write(f"| {part} | {cells} |\n")

    for name in names:
        out.write(f"\n## {name}: the {args.top} functions with the most CPU time\n\n")
        out.write("Functions marked (kernel) run in the Linux kernel.\n\n")
        out.write("| share | function |\n|---:|---|\n")
        for function, time in by_function[name].most_common(args.top):
            label = function.removesuffix(KERNEL_MARK)
            label = label.replace("|", "\\|")
            if len(label) > 160:
                label = label[:157] + "..."
            if function.endswith(KERNEL_MARK):
                label = f"{label}` (kernel)"
            else:
                label = f"{label}`"
            out.write(f"| {percent(time, totals[name])} | `{label} |\n")

if __name__ == "__main__":
    main()
