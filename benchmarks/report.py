"""Print every table and the final summary from benchmarks/results/*.json, and draw the one chart
(benchmarks/results/bench.png). Runs at the end of `make bench`; rerun alone to redraw."""

from __future__ import annotations

from typing import Any

import bench_costs
import bench_executor
import bench_fleet
import bench_http
import bench_list
from common import RESULTS, read_json, table


def summary(http: Any, listing: Any, costs: Any, fleet: Any, executor: Any, about: Any) -> str:
    rows: list[list[Any]] = []
    if http:
        for aim in http["aims"]:
            op = next(r["op"] for r in http["rows"] if r["endpoint"] == aim["endpoint"])
            r16 = next(r for r in http["rows"] if r["op"] == op and r["concurrency"] == 16)
            r64 = next(r for r in http["rows"] if r["op"] == op and r["concurrency"] == 64)
            rows.append(
                [
                    f"{aim['endpoint']} req/s at c=16: ours / bare / db",
                    f"{r16['ours']['rps']:,.0f} / {r16['bare']['rps']:,.0f} / {r16['db']['rps']:,.0f}",
                    f"ours/bare {aim['throughput_ratio_c16']:.0%} "
                    f"(aim ≥ 80%: {'met' if aim['throughput_met'] else 'missed'})",
                ]
            )
            rows.append(
                [
                    f"{aim['endpoint']} p99 at c=64: ours / bare",
                    f"{r64['ours']['p99_ms']:.1f} / {r64['bare']['p99_ms']:.1f} ms",
                    f"{aim['p99_ratio_c64']:.2f}x (aim ≤ {bench_http.AIM_P99:g}x: "
                    f"{'met' if aim['p99_met'] else 'missed'})",
                ]
            )
        for r in http["rows"]:
            if r["concurrency"] == 16 and r["op"] == "create_cancel":
                rows.append(
                    [
                        f"{r['endpoint']} req/s at c=16: ours / bare / db",
                        f"{r['ours']['rps']:,.0f} / {r['bare']['rps']:,.0f} / {r['db']['rps']:,.0f}",
                        f"ours/bare {r['ours_over_bare_rps']:.0%}, bare/db {r['bare_over_db_rps']:.0%}",
                    ]
                )
    if listing:
        for r in listing["rows"]:
            rows.append(
                [
                    f"GET /runs {r['query']} ({listing['table_rows']:,} runs) p50 / p99",
                    f"{r['http']['p50_ms']:.1f} / {r['http']['p99_ms']:.1f} ms",
                    f"collection_list_runs alone {r['db_p50_ms']:.1f} ms",
                ]
            )
    if costs:
        trips = ", ".join(f"{r['endpoint']} {r['round_trips_per_request']:g}" for r in costs["round_trips"])
        rows.append(["DB round trips per request", trips, "pg_stat_statements"])
        for r in costs["auth"]:
            rows.append([r["what"], f"{r['us']:.1f} µs", ""])
    if fleet:
        for r in fleet["rows"]:
            rows.append(
                [
                    f"fleet, {r['processes']} process(es) on one account",
                    f"{r['accepted_per_s']:.1f} of {r['limit_per_s']} calls/s ({r['rate_over_limit']:.0%}), "
                    f"429 {r['refused_share']:.1%}",
                    "org a / b / c while all had work "
                    + " / ".join(f"{share:.0%}" for share in r["org_shares_all_busy"].values()),
                ]
            )
    if executor:
        for r in executor["runs"]:
            bound = (
                f"bound {r['bound_items_per_s']:g}: {r['efficiency']:.0%}"
                if r.get("efficiency")
                else "no bound"
            )
            rows.append(
                [f"executor {r['label']}", f"{r['items_per_s']} items/s", f"{r['items']} items; {bound}"]
            )
        for s in executor["startup"]:
            rows.append(
                [
                    f"start-up, {s['label']}",
                    f"/healthz {s['healthz_s']} s, recovery line {s['recovery_log_s']} s",
                    "",
                ]
            )
    if about:
        rows.append(
            [
                "machine",
                f"{about['nproc']} CPUs {about['cpu_model']}, {about['memory_gib']} GiB",
                f"load {about['load_average_at_start']} → {about.get('load_average_at_end')}",
            ]
        )
    return table(["figure", "value", "note"], rows, "Summary")


def chart(http: Any, listing: Any, costs: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    colours = {"ours": "#1f77b4", "bare": "#ff7f0e", "db": "#2ca02c"}
    if http:
        labels = [e[0] for e in bench_http.ENDPOINTS]
        for ax, c, metric, title in (
            (axes[0][0], 16, "rps", "Requests/s at c=16 (higher is better)"),
            (axes[0][1], 64, "p99_ms", "p99 latency at c=64, ms (lower is better)"),
        ):
            width = 0.27
            for i, target in enumerate(("ours", "bare", "db")):
                values = [
                    next(r for r in http["rows"] if r["endpoint"] == lab and r["concurrency"] == c)[target][
                        metric
                    ]
                    for lab in labels
                ]
                xs = [x + (i - 1) * width for x in range(len(labels))]
                bars = ax.bar(
                    xs,
                    values,
                    width,
                    label={"ours": "our API", "bare": "bare FastAPI", "db": "asyncpg pool"}[target],
                    color=colours[target],
                )
                ax.bar_label(bars, fmt="%.0f" if metric == "rps" else "%.1f", fontsize=7)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(title)
            ax.legend(fontsize=8)
    if listing:
        pages = listing["rows"]
        labels = [r["query"] for r in pages]
        ax = axes[1][0]
        width = 0.38
        for offset, values, label, colour in (
            (-width / 2, [r["http"]["p50_ms"] for r in pages], "HTTP p50 (wrk, c=1)", "#1f77b4"),
            (width / 2, [r["db_p50_ms"] for r in pages], "collection_list_runs alone", "#2ca02c"),
        ):
            bars = ax.bar([x + offset for x in range(len(labels))], values, width, label=label, color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.margins(y=0.15)
        ax.set_title(
            f"GET /runs p50 ms, {listing['table_rows']:,} runs ({listing['org_rows']:,} in the org), c=1"
        )
        ax.legend(fontsize=8)
    if costs:
        ax = axes[1][1]
        layers = bench_costs.layers(costs["anatomy"])
        names = [name for name, _ in layers]
        values = [us for _, us in layers]
        bars = ax.barh(range(len(names)), values, color="#9467bd")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title("GET /runs/{id}: server CPU µs per request, by layer")
    fig.tight_layout()
    fig.savefig(RESULTS / "bench.png", dpi=110)
    plt.close(fig)


def main() -> None:
    http, listing, costs, fleet, executor, about = (
        read_json(n) for n in ("http", "list", "costs", "fleet", "executor", "machine")
    )
    # Results written by an earlier version of a part (another layout) wait for that part's next run.
    if listing and "rows" not in listing:
        print("results/list.json is from an earlier part 2 (before / after): rerun part 2 (list)")
        listing = None
    if costs and any("layer" not in r for r in costs["anatomy"]):
        print("results/costs.json is from an earlier part 3: rerun part 3 (costs)")
        costs = None
    if listing:
        print(bench_list.tables(listing))
    if http:
        print(bench_http.tables(http))
    if costs:
        print(bench_costs.tables(costs))
    if fleet:
        print(bench_fleet.tables(fleet))
    if executor:
        print(bench_executor.tables(executor))
    print(summary(http, listing, costs, fleet, executor, about))
    chart(http, listing, costs)
    print(f"\nchart: {RESULTS / 'bench.png'}; numbers: {RESULTS}/*.json")


if __name__ == "__main__":
    main()
