"""Part 1: requests/s and p50/p99 at c=1, 16, 64 per endpoint, each beside its two limits measured in
the same run: (a) the bare FastAPI app (framework limit), (b) the same SQL through an asyncpg pool
(database limit). Also the server's and Postgres' CPU per request, which explains the ratios on a
machine where the load generator, the server and Postgres share 2 cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import BENCH, DURATION, WARMUP, LoadResult, Proc, load_average, log, table, wrk

ENDPOINTS = [
    # label, db_limit op, wrk script
    ("GET /runs/{id}", "get_run", "get_run.lua"),
    ("GET /runs", "list_runs", "list_runs.lua"),
    ("POST /estimate", "estimate", "estimate.lua"),
    ("POST /runs + cancel", "create_cancel", "create_cancel.lua"),
]
CONCURRENCY = [1, 16, 64]
AIM_ENDPOINTS = ("get_run", "list_runs", "estimate")  # issue 11's aims
# Read endpoints also measured in the Supabase REST mode (through the loopback PostgREST bridge).
REST_ENDPOINTS = ("get_run", "list_runs")
AIM_THROUGHPUT = 0.80  # ours/bare at c=16
AIM_P99 = 1.0  # ours/bare p99 at c=64 (issue 11)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (all threads)


def postgres_ticks(postmaster_pid: int) -> int:
    """CPU of the postmaster and its children (backends, background workers) of our Postgres only."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == postmaster_pid or int(fields[1]) == postmaster_pid:
            total += int(fields[11]) + int(fields[12])
    return total


def measured(
    proc: Proc, postmaster: int, script: str, c: int, env: dict[str, str], duration: float = DURATION
) -> dict[str, Any]:
    import os

    tick = os.sysconf("SC_CLK_TCK")
    for attempt in range(2):  # noqa: B007  (read after the loop)
        restarted = proc.ensure_running()
        wrk(proc.url, script, c, WARMUP, **env)
        server0, pg0 = cpu_ticks(proc.pid), postgres_ticks(postmaster)
        result: LoadResult = wrk(proc.url, script, c, duration, **env)
        if proc.process is not None and proc.process.poll() is None:
            break
        # Stopped from outside during the measurement: measure again on a fresh process.
    server1, pg1 = cpu_ticks(proc.pid), postgres_ticks(postmaster)
    out = result.as_dict()
    out["restarted"] = restarted or attempt > 0
    n = max(1, result.requests)
    out["server_cpu_us_per_req"] = round((server1 - server0) / tick / n * 1e6, 1)
    out["postgres_cpu_us_per_req"] = round((pg1 - pg0) / tick / n * 1e6, 1)
    return out


def side_by_side(
    ours_proc: Proc, bare_proc: Proc, postmaster: int, script: str, c: int, env: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ours and the bare endpoint in the order ours, bare, bare, ours, half the time each: the
    machine's speed drifts by several percent over a minute here (other VMs on the host), and this
    order cancels a steady drift out of the ratio."""
    half = math.ceil(DURATION / 2)
    ours_a = measured(ours_proc, postmaster, script, c, env, half)
    bare_a = measured(bare_proc, postmaster, script, c, env, half)
    bare_b = measured(bare_proc, postmaster, script, c, env, half)
    ours_b = measured(ours_proc, postmaster, script, c, env, half)
    return combined(ours_a, ours_b), combined(bare_a, bare_b)


def combined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two measurements of one target as one: counts and time add up, per-request CPU is weighted by
    requests, and each latency percentile is the mean of the two (wrk reports no histogram)."""
    requests = a["requests"] + b["requests"]
    seconds = a["seconds"] + b["seconds"]
    out = {
        "requests": requests,
        "seconds": round(seconds, 3),
        "rps": round(requests / seconds, 3) if seconds else 0.0,
        "restarted": a["restarted"] or b["restarted"],
    }
    for key in ("errors", "non_2xx"):
        out[key] = a[key] + b[key]
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        out[key] = round((a[key] + b[key]) / 2, 3)
    out["max_ms"] = max(a["max_ms"], b["max_ms"])
    for key in ("server_cpu_us_per_req", "postgres_cpu_us_per_req"):
        weighted = a[key] * a["requests"] + b[key] * b["requests"]
        out[key] = round(weighted / requests, 1) if requests else 0.0
    return out


def db_limit(ctx: Any, op: str, c: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(BENCH / "db_limit.py"),
        "--dsn", ctx.pg.dsn,
        "--op", op,
        "--org", str(ctx.bench.org_id),
        "--user", str(ctx.bench.user_id),
        "--run", str(ctx.run_id),
        "--concurrency", str(c),
        "--duration", str(DURATION),
        "--warmup", str(WARMUP),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + WARMUP + 60)
    if out.returncode != 0:
        raise RuntimeError(f"db_limit failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run(ctx: Any) -> dict[str, Any]:
    postmaster = ctx.postmaster_pid()
    env = {"BENCH_TOKEN": ctx.token, "BENCH_RUN_ID": str(ctx.run_id), "BENCH_QUERY": "limit=20"}
    rows: list[dict[str, Any]] = []
    log(f"part 1: {len(ENDPOINTS)} endpoints x c={CONCURRENCY} x (ours, bare, db), {DURATION:g} s each")
    for label, op, script in ENDPOINTS:
        for c in CONCURRENCY:
            load = load_average()
            ours, bare = side_by_side(ctx.api, ctx.bare, postmaster, script, c, env)
            db = db_limit(ctx, op, c)
            baseline = measured(ctx.baseline, postmaster, script, c, env) if ctx.baseline else None
            rest = (
                measured(ctx.rest, postmaster, script, c, env) if ctx.rest and op in REST_ENDPOINTS else None
            )
            row = {
                "endpoint": label,
                "op": op,
                "concurrency": c,
                "ours": ours,
                "bare": bare,
                "db": db,
                "ours_over_bare_rps": ratio(ours["rps"], bare["rps"]),
                "bare_over_db_rps": ratio(bare["rps"], db["rps"]),
                "ours_over_bare_p99": ratio(ours["p99_ms"], bare["p99_ms"]),
                "load_average": load,
            }
            if rest:
                row["rest"] = rest
                row["rest_over_ours_rps"] = ratio(rest["rps"], ours["rps"])
            if baseline:
                row["baseline"] = baseline
                row["ours_over_baseline_rps"] = ratio(ours["rps"], baseline["rps"])
            rows.append(row)
            log(
                f"  {label:20s} c={c:<3d} ours {ours['rps']:7.0f}/s p99 {ours['p99_ms']:6.1f} ms | "
                f"bare {bare['rps']:7.0f}/s p99 {bare['p99_ms']:6.1f} ms | db {db['rps']:7.0f}/s | "
                f"ours/bare {row['ours_over_bare_rps']:.2f} bare/db {row['bare_over_db_rps']:.2f}"
                + (
                    f" | non-2xx {ours['non_2xx']}/{bare['non_2xx']}"
                    if ours["non_2xx"] or bare["non_2xx"]
                    else ""
                )
                + (
                    f" | baseline {baseline['rps']:7.0f}/s p99 {baseline['p99_ms']:6.1f} ms"
                    if baseline
                    else ""
                )
            )
    import os

    return {
        "rows": rows,
        "aims": aims(rows),
        "duration_s": DURATION,
        "warmup_s": WARMUP,
        "baseline": f"the API at git {os.environ['BENCH_BASELINE']}"
        if os.environ.get("BENCH_BASELINE")
        else None,
    }


def aims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for op in AIM_ENDPOINTS:
        at16 = next(r for r in rows if r["op"] == op and r["concurrency"] == 16)
        at64 = next(r for r in rows if r["op"] == op and r["concurrency"] == 64)
        found.append(
            {
                "endpoint": at16["endpoint"],
                "throughput_ratio_c16": at16["ours_over_bare_rps"],
                "throughput_met": at16["ours_over_bare_rps"] >= AIM_THROUGHPUT,
                "p99_ratio_c64": at64["ours_over_bare_p99"],
                "p99_met": at64["ours_over_bare_p99"] <= AIM_P99,
            }
        )
    return found


def tables(result: dict[str, Any]) -> str:
    out = []
    headers = [
        "endpoint", "c",
        "ours req/s", "p50 ms", "p99 ms",
        "bare req/s", "p50 ms", "p99 ms",
        "db req/s", "p50 ms", "p99 ms",
        "ours/bare", "bare/db", "p99 ours/bare",
        "server CPU µs/req ours / bare",
        "Postgres CPU µs/req ours / bare",
    ]  # fmt: skip
    body = []
    for r in result["rows"]:
        o, b, d = r["ours"], r["bare"], r["db"]
        body.append(
            [
                r["endpoint"], r["concurrency"],
                o["rps"], o["p50_ms"], o["p99_ms"],
                b["rps"], b["p50_ms"], b["p99_ms"],
                d["rps"], d["p50_ms"], d["p99_ms"],
                r["ours_over_bare_rps"], r["bare_over_db_rps"], r["ours_over_bare_p99"],
                f"{o['server_cpu_us_per_req']:.0f} / {b['server_cpu_us_per_req']:.0f}",
                f"{o['postgres_cpu_us_per_req']:.0f} / {b['postgres_cpu_us_per_req']:.0f}",
            ]
        )  # fmt: skip
    out.append(
        table(headers, body, "Part 1: throughput and latency beside the framework and database limits")
    )
    if any("baseline" in r for r in result["rows"]):
        out.append(
            table(
                [
                    "endpoint",
                    "c",
                    "before req/s",
                    "p50 ms",
                    "p99 ms",
                    "after req/s",
                    "p50 ms",
                    "p99 ms",
                    "after/before",
                ],
                [
                    [
                        r["endpoint"],
                        r["concurrency"],
                        r["baseline"]["rps"],
                        r["baseline"]["p50_ms"],
                        r["baseline"]["p99_ms"],
                        r["ours"]["rps"],
                        r["ours"]["p50_ms"],
                        r["ours"]["p99_ms"],
                        r["ours_over_baseline_rps"],
                    ]
                    for r in result["rows"]
                    if "baseline" in r
                ],  # fmt: skip
                f"Part 1: our API before ({result.get('baseline')}) and as it is",
            )
        )
    if any("rest" in r for r in result["rows"]):
        out.append(
            table(
                [
                    "endpoint",
                    "c",
                    "direct req/s",
                    "p50 ms",
                    "p99 ms",
                    "REST mode req/s",
                    "p50 ms",
                    "p99 ms",
                    "REST/direct",
                ],
                [
                    [
                        r["endpoint"],
                        r["concurrency"],
                        r["ours"]["rps"],
                        r["ours"]["p50_ms"],
                        r["ours"]["p99_ms"],
                        r["rest"]["rps"],
                        r["rest"]["p50_ms"],
                        r["rest"]["p99_ms"],
                        r["rest_over_ours_rps"],
                    ]
                    for r in result["rows"]
                    if "rest" in r
                ],  # fmt: skip
                "Part 1: read endpoints in the Supabase REST mode, through the loopback PostgREST bridge "
                "(tests/postgrest_bridge.py, not a real PostgREST), beside the direct mode",
            )
        )
    aim_rows = [
        [
            a["endpoint"],
            f"{a['throughput_ratio_c16']:.0%}",
            "met" if a["throughput_met"] else "MISSED",
            f"{a['p99_ratio_c64']:.2f}x",
            "met" if a["p99_met"] else "MISSED",
        ]
        for a in result["aims"]
    ]
    out.append(
        table(
            [
                "endpoint",
                "ours/bare req/s at c=16 (aim ≥ 80%)",
                "",
                f"ours/bare p99 at c=64 (aim ≤ {AIM_P99:g}x)",
                "",
            ],
            aim_rows,
            "Part 1: the aims",
        )
    )
    return "\n".join(out)
