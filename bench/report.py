#!/usr/bin/env python3
"""Write bench/RESULTS.md from the raw measurements of bench/run.sh.

Each line of the raw file is one wrk run of one target in one round. The report gives the
median over rounds of every figure, except errors (summed over rounds) and peak resident
memory (the highest of the rounds), and marks each performance target met or missed.
"""

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

TARGET_LABELS = {
    "direct": "direct upstream",
    "nginx": "nginx pair (mTLS)",
    "relay": "relay pair, memory",
    "relay-redis": "relay pair, Redis",
}
RELAY_TARGETS = ("relay", "relay-redis")
LOAD_CASES = ("c100-1k", "c200-1k", "c300-1k")
MIB = 1024 * 1024
# Descriptions of the relay builds, by the BUILD setting of bench/run.sh.
BUILDS = {
    "pgo": "profile-guided release build (`deploy/build-pgo.sh`, as the container image ships it)",
    "plain": "plain release build (`cargo build --release`)",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", help="JSON lines written by bench/run.sh")
    parser.add_argument("--meta", help="JSON file with the run's settings and tool versions")
    parser.add_argument("--out", help="Markdown file to write")
    parser.add_argument(
        "--notes",
        default=str(Path(__file__).with_name("notes.md")),
        help="hand-written Markdown appended to the report when the file exists",
    )
    parser.add_argument("--summary-line", metavar="WRK_JSON", help="print one line for a wrk summary and exit")
    return parser.parse_args()


def requests_per_second(wrk):
    return wrk["requests"] / (wrk["duration_us"] / 1e6)


def errors_of(wrk):
    return sum(wrk[key] for key in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout"))


def summary_line(path):
    wrk = json.loads(Path(path).read_text())
    latency = wrk["latency_us"]
    return (
        f"{requests_per_second(wrk):.0f} req/s, p50 {latency['p50'] / 1000:.2f} ms, "
        f"p99 {latency['p99'] / 1000:.2f} ms, errors {errors_of(wrk)}"
    )


def aggregate(runs, ticks_per_second):
    """Group runs by (case, target) and compute the reported figures."""
    groups = {}
    for run in runs:
        groups.setdefault((run["case"], run["target"]), []).append(run)

    figures = {}
    for key, group in groups.items():
        cpu_per_request = []
        redis_cpu_per_request = []
        for run in group:
            requests = max(run["wrk"]["requests"], 1)
            cpu_per_request.append(run["cpu_ticks"] * 1e6 / ticks_per_second / requests)
            redis_cpu_per_request.append(run["redis_cpu_ticks"] * 1e6 / ticks_per_second / requests)
        figures[key] = {
            "connections": group[0]["connections"],
            "body": group[0]["body"],
            "rounds": len(group),
            "rps": statistics.median(requests_per_second(run["wrk"]) for run in group),
            "p50_ms": statistics.median(run["wrk"]["latency_us"]["p50"] for run in group) / 1000,
            "p90_ms": statistics.median(run["wrk"]["latency_us"]["p90"] for run in group) / 1000,
            "p99_ms": statistics.median(run["wrk"]["latency_us"]["p99"] for run in group) / 1000,
            "errors": sum(errors_of(run["wrk"]) for run in group),
            "requests": sum(run["wrk"]["requests"] for run in group),
            "cpu_us_per_request": statistics.median(cpu_per_request),
            "redis_cpu_us_per_request": statistics.median(redis_cpu_per_request),
            "peak_rss_a_mib": max(run["peak_rss_a_kib"] for run in group) / 1024,
            "peak_rss_b_mib": max(run["peak_rss_b_kib"] for run in group) / 1024,
        }
    return figures


def machine_description():
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": memory_kib / MIB,
        "kernel": platform.release(),
    }


def ratio(numerator, denominator):
    return numerator / denominator if denominator else float("nan")


def status(met):
    return "**met**" if met else "**missed**"


def results_table(figures, cases):
    lines = [
        "| case | target | conns | body | req/s | p50 ms | p90 ms | p99 ms | errors | CPU µs/req | peak RSS A / B MiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for target in TARGET_LABELS:
            figure = figures.get((case, target))
            if figure is None:
                continue
            cpu = "-" if target == "direct" else f"{figure['cpu_us_per_request']:.1f}"
            if target == "relay-redis":
                cpu += f" (+{figure['redis_cpu_us_per_request']:.1f} Redis)"
            rss = "-"
            if target in RELAY_TARGETS:
                rss = f"{figure['peak_rss_a_mib']:.1f} / {figure['peak_rss_b_mib']:.1f}"
            lines.append(
                f"| {case} | {TARGET_LABELS[target]} | {figure['connections']} | {figure['body']} | "
                f"{figure['rps']:.0f} | {figure['p50_ms']:.2f} | {figure['p90_ms']:.2f} | {figure['p99_ms']:.2f} | "
                f"{figure['errors']} | {cpu} | {rss} |"
            )
    return lines


def ratios_table(figures, cases):
    lines = [
        "| case | target | throughput ratio | p99 ratio | CPU µs/req ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for case in cases:
        nginx = figures.get((case, "nginx"))
        if nginx is None:
            continue
        for target in RELAY_TARGETS:
            relay = figures.get((case, target))
            if relay is None:
                continue
            lines.append(
                f"| {case} | {TARGET_LABELS[target]} | {ratio(relay['rps'], nginx['rps']):.2f} | "
                f"{ratio(relay['p99_ms'], nginx['p99_ms']):.2f} | "
                f"{ratio(relay['cpu_us_per_request'], nginx['cpu_us_per_request']):.2f} |"
            )
    return lines


def evaluate_targets(figures):
    """Return rows of (target, measured figure, met) for every performance target."""
    rows = []
    for case in LOAD_CASES:
        relay, nginx = figures.get((case, "relay")), figures.get((case, "nginx"))
        if relay is None or nginx is None:
            continue
        throughput = ratio(relay["rps"], nginx["rps"])
        rows.append((
            f"{case}: relay pair throughput >= 1.0x nginx pair, p99 not higher, zero errors",
            f"{throughput:.2f}x, p99 {relay['p99_ms']:.2f} vs {nginx['p99_ms']:.2f} ms, {relay['errors']} errors",
            throughput >= 1.0 and relay["p99_ms"] <= nginx["p99_ms"] and relay["errors"] == 0,
        ))
    for case in LOAD_CASES:
        relay, nginx = figures.get((case, "relay")), figures.get((case, "nginx"))
        if relay is None or nginx is None:
            continue
        rows.append((
            f"{case}: CPU µs/req of both relays <= nginx pair",
            f"{relay['cpu_us_per_request']:.1f} vs {nginx['cpu_us_per_request']:.1f} µs/req",
            relay["cpu_us_per_request"] <= nginx["cpu_us_per_request"],
        ))

    direct = figures.get(("light-1k", "direct"))
    for target in RELAY_TARGETS:
        relay = figures.get(("light-1k", target))
        if relay is None or direct is None:
            continue
        added = relay["p50_ms"] - direct["p50_ms"]
        rows.append((
            f"light load (10 connections), {TARGET_LABELS[target]}: added p50 over direct < 0.5 ms",
            f"{added:.3f} ms ({relay['p50_ms']:.3f} vs {direct['p50_ms']:.3f} ms)",
            added < 0.5,
        ))

    for case in LOAD_CASES:
        redis, memory = figures.get((case, "relay-redis")), figures.get((case, "relay"))
        if redis is None or memory is None:
            continue
        share = ratio(redis["rps"], memory["rps"])
        rows.append((
            f"{case}: Redis mode >= 85% of memory mode throughput",
            # One decimal, so that a share just under the line never reads as 85 %.
            f"{share * 100:.1f}% ({redis['rps']:.0f} vs {memory['rps']:.0f} req/s)",
            share >= 0.85,
        ))

    for target in RELAY_TARGETS:
        figure = figures.get(("c300-1k", target))
        if figure is None:
            continue
        peak = max(figure["peak_rss_a_mib"], figure["peak_rss_b_mib"])
        rows.append((
            f"c300-1k, {TARGET_LABELS[target]}: each relay < 50 MiB peak RSS",
            f"A {figure['peak_rss_a_mib']:.1f} MiB, B {figure['peak_rss_b_mib']:.1f} MiB",
            peak < 50,
        ))

    # Streaming: at the same 10 connections, 16 times larger bodies must not raise the peak
    # resident set by more than a quarter. Holding every 1 MiB body whole would add at least
    # 10 x 1 MiB per relay.
    for target in RELAY_TARGETS:
        small, large = figures.get(("c10-64k", target)), figures.get(("c10-1m", target))
        if small is None or large is None:
            continue
        growth = [
            ratio(large[key], small[key]) for key in ("peak_rss_a_mib", "peak_rss_b_mib")
        ]
        rows.append((
            f"{TARGET_LABELS[target]}: 1 MiB bodies stream, peak RSS at 1 MiB < 1.25x peak RSS at 64 KiB (10 connections)",
            f"A {small['peak_rss_a_mib']:.1f} -> {large['peak_rss_a_mib']:.1f} MiB, "
            f"B {small['peak_rss_b_mib']:.1f} -> {large['peak_rss_b_mib']:.1f} MiB",
            max(growth) < 1.25,
        ))
    return rows


def load_summary(runs):
    loads = [run["load1"] for run in runs]
    return min(loads), statistics.median(loads), max(loads)


def render(runs, meta, notes):
    figures = aggregate(runs, meta["clock_ticks_per_second"])
    cases = list(dict.fromkeys(run["case"] for run in runs))
    machine = machine_description()
    load_min, load_median, load_max = load_summary(runs)
    quick = " (QUICK=1 smoke test, not a measurement)" if meta["quick"] else ""

    out = [
        f"# api-relay load benchmark{quick}",
        "",
        "The relay pair against a pair of nginx reverse proxies with mutual TLS between them, both in "
        "front of the same nginx upstream, on one machine. `bench/run.sh` produced this page; "
        "`bench/report.py` wrote it from the raw figures in the `.jsonl` file beside it.",
        "",
        "## Run",
        "",
        f"- Date: {meta['started_at']} to {meta['finished_at']} (UTC), commit {meta['commit']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']:.1f} GiB memory, "
        f"Linux {machine['kernel']}",
        f"- Tools: {meta['rustc']}; {meta['nginx']}; {meta['wrk']}; {meta['redis']}; {meta['openssl']}",
        f"- {meta['rounds']} round(s) of {meta['duration']} per run, wrk with {meta['threads']} threads. "
        "Each round runs every case against the direct upstream, the nginx pair, the relay pair and the "
        "relay pair with Redis, in that order.",
        f"- Load average (1, 5 and 15 min): {meta['load_before']} before, {meta['load_after']} after; "
        f"1-minute load at the end of each run: min {load_min:.2f}, median {load_median:.2f}, max {load_max:.2f}. "
        "wrk, the upstream and the proxies under test share the CPUs, so the load is high during every run; "
        "targets are compared within one round-robin run, where the same load hits every target alike.",
        "",
        "## Commands",
        "",
        "```sh",
        f"DURATION={meta['duration']} ROUNDS={meta['rounds']} bench/run.sh"
        + ("   # QUICK=1" if meta["quick"] else ""),
        meta.get("build_command", "cargo build --release --locked"),
        "# every measured run, with BENCH_BODY_FILE, BENCH_OUTBOUND_TOKEN, BENCH_PEER and BENCH_DELAY_MS set:",
        f"wrk -t{meta['threads']} -c<connections> -d{meta['duration']} --timeout 5s -s bench/post.lua "
        "http://127.0.0.1:<port>/api[/64k|/1m]",
        "# relays (memory mode); the Redis pair adds REDIS_URL=redis://127.0.0.1:<port> and REDIS_KEY_PREFIX:",
        "UPSTREAM=http://127.0.0.1:<upstream> CLIENT_ID_SECRET=<random> OUTBOUND_TOKEN=<random> "
        "PAIRING_PSK=<random, same on both> PORT=<port> BIND_ADDRESS=127.0.0.1 LOG_FORMAT=json "
        f"[OUTBOUND_ALLOWLIST=http://127.0.0.1:<relay B>] {meta.get('relay_binary', 'target/release/api-relay')}",
        "redis-server --bind 127.0.0.1 --port <port> --save '' --appendonly no",
        "nginx -c <run folder>/{upstream,nginx-a,nginx-b}.conf -p <run folder>",
        "```",
        "",
        "Setup, as `bench/run.sh` writes it:",
        "",
        "- Upstream: nginx, 2 workers, `POST /api`, `/api/64k` and `/api/1m` return 200 with a fixed JSON body "
        "of 1024 bytes, 64 KiB and 1 MiB. Every request sends a body of the same size as its response.",
        "- nginx pair: nginx A (plain HTTP in) proxies over HTTPS, TLS 1.3, with a client certificate to nginx B, "
        "which requires a client certificate signed by the bench CA and proxies to the upstream. Both run 2 "
        "workers, keep-alive pools on every hop, request bodies streamed (`proxy_request_buffering off`), "
        "access logs buffered to files. Certificates: a throw-away CA, server and client certificates, ECDSA P-256.",
        f"- Relay pair: two relays of the {BUILDS.get(meta.get('build', 'plain'), 'release build')} with "
        "default settings (workers = number of CPUs), JSON logs to files. Between the relays the traffic is "
        "plain HTTP sealed by the relay protocol, with no TLS.",
        f"- Light load: 10 connections, each pausing {meta['light_delay_ms']} ms between a response and its next "
        "request (at most about 1000 requests/s), so latency is not queueing.",
        "- CPU µs/req: utime + stime from `/proc/<pid>/stat` over the run, divided by the requests wrk completed. "
        "Relay rows count both relays; nginx rows count both nginx masters and their workers; Redis CPU is shown "
        "apart. The upstream and wrk are not counted.",
        "- Peak RSS: `VmHWM` from `/proc/<pid>/status`, reset before each run through `/proc/<pid>/clear_refs`, "
        "highest of the rounds. The reset sets the peak to the current resident set, and the allocator keeps "
        "memory freed by earlier cases, so a figure is never below what earlier cases left resident.",
        "- Errors: socket errors (connect, read, write, timeout) plus responses with status 400 or above, "
        "summed over rounds. wrk 4.1 does not count 1xx or 3xx answers as errors; the start-up check sends one "
        "request of each size through every target and requires status 200 and the full body.",
        "",
        "## Results",
        "",
        "Medians over rounds; p50/p90/p99 are wrk's latency percentiles.",
        "",
        *results_table(figures, cases),
        "",
        "## Ratios to the nginx pair",
        "",
        "Relay figure divided by the nginx pair's figure in the same case: throughput above 1 is better, "
        "p99 and CPU below 1 are better.",
        "",
        *ratios_table(figures, cases),
        "",
        "## Targets",
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    for name, measured, met in evaluate_targets(figures):
        out.append(f"| {name} | {measured} | {status(met)} |")
    out.append("")
    if meta["quick"]:
        # The notes describe the recorded run on bench/RESULTS.md, not this one.
        out.append("The notes on reading these figures, the profile and what remains are in bench/RESULTS.md.")
        out.append("")
    elif notes:
        out.append(notes.rstrip())
        out.append("")
    return "\n".join(out)


def main():
    args = parse_args()
    if args.summary_line:
        print(summary_line(args.summary_line))
        return
    if not (args.raw and args.meta and args.out):
        raise SystemExit("report.py: --raw, --meta and --out are required unless --summary-line is given")

    runs = [json.loads(line) for line in Path(args.raw).read_text().splitlines() if line.strip()]
    if not runs:
        raise SystemExit(f"report.py: no measurements in {args.raw}")
    meta = json.loads(Path(args.meta).read_text())
    notes_path = Path(args.notes)
    notes = notes_path.read_text() if notes_path.is_file() else ""
    Path(args.out).write_text(render(runs, meta, notes))


if __name__ == "__main__":
    main()
