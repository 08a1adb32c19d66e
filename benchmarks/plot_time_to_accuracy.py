#!/usr/bin/env python3
"""Test accuracy against wall time, one line per run and a panel per cluster and link rate, from
benchmarks/cluster_training.sh's lines: a PNG drawn by gnuplot, and on stdout a Markdown table
of each run's time to the target accuracy, steps/s, bytes that left the hosts and final accuracy.

  benchmarks/plot_time_to_accuracy.py RUNS.jsonl OUT.png [--target 0.90]
"""
import argparse
import json
import subprocess
import sys
from collections import OrderedDict


def load(path):
    panels = OrderedDict()  # (hosts, slots, rate) -> run -> [rows]
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
                key = (int(row["hosts"]), int(row["slots"]), str(row["rate"]))
                float(row["wall_s"]), float(row["test_accuracy"])
            except (ValueError, KeyError, TypeError) as error:
                sys.exit(f"{path}:{number}: not a cluster_training.sh line ({error})")
            panels.setdefault(key, OrderedDict()).setdefault(row["run"], []).append(row)
    if not panels:
        sys.exit(f"{path}: no runs")
    return panels


def title(key):
    hosts, slots, rate = key
    where = "one host, no shaping" if rate == "local" else f"{hosts} hosts x {slots}, {rate}"
    return f"{where} ({hosts * slots} ranks)"


def summary(panels, target):
    print(f"| where | run | time to {target:.2f} (s) | steps/s | left the hosts (MB) | final accuracy |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for key, runs in panels.items():
        for run, rows in runs.items():
            reached = next((r["wall_s"] for r in rows if r["test_accuracy"] >= target), None)
            seconds = sum(r["seconds"] for r in rows)
            steps = sum(r["samples_per_s"] * r["seconds"] / r["batch_size"] for r in rows)
            sent = rows[-1]["host_bytes"]
            print(f"| {title(key)} | {run} | {'not reached' if reached is None else f'{reached:.1f}'} "
                  f"| {steps / seconds:.1f} | {'–' if sent is None else f'{sent / 1e6:.0f}'} "
                  f"| {rows[-1]['test_accuracy']:.4f} |")


def plot(panels, target, out):
    script = [
        "set terminal pngcairo size {},420 font ',9'".format(420 * len(panels)),
        f"set output '{out}'",
        f"set multiplot layout 1,{len(panels)}",
        "set key bottom right",
        "set xlabel 'wall time from launch (s)'",
        "set ylabel 'test accuracy'",
        "set grid",
        "set yrange [0.80:0.93]",
    ]
    data = []
    for key, runs in panels.items():
        script.append(f"set title '{title(key)}'")
        plots = []
        for run, rows in runs.items():
            block = "\n".join(f"{r['wall_s']} {r['test_accuracy']}" for r in rows)
            data.append(block + "\ne")
            plots.append(f"'-' using 1:2 with linespoints title '{run}'")
        plots.append(f"{target} with lines dashtype 2 linecolor 'gray' title '{target:.2f}'")
        script.append("plot " + ", ".join(plots))
        script.extend(data)
        data = []
    script.append("unset multiplot")
    subprocess.run(["gnuplot"], input="\n".join(script) + "\n", text=True, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("png")
    parser.add_argument("--target", type=float, default=0.90)
    args = parser.parse_args()
    panels = load(args.runs)
    summary(panels, args.target)
    plot(panels, args.target, args.png)


if __name__ == "__main__":
    main()
