"""The one table of tools/device_check.sh: parity tests, forward throughput + MFU + host feed (tools/bench.py
--json), training step time against sentence-transformers' trainer (tools/bench_train.py --json). Prints it and
writes it, as markdown for BENCHMARKS.md, to --output. A stage that did not run or failed is a row saying so.

    python tools/device_table.py --output device_check.md --tests tests.log --bench base.json large.json \
        --train train.json --device "NVIDIA H100 80GB HBM3" --note "gpu, jax 0.x"
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

COLUMNS = ["check", "model", "run", "real tokens/s", "MFU", "host feed tokens/s", "step ms", "result"]


def _load(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return None


def test_row(log: str | None, what: str) -> list[str]:
    """pytest's last summary line ("3 passed, 1 skipped in 9.1s"), from its log."""
    text = Path(log).read_text() if log and Path(log).is_file() else ""
    lines = [ln.strip("= ").strip() for ln in text.splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    result = lines[-1] if lines else ("did not finish (timed out or crashed: see its log)" if text else "not run")
    return ["parity tests", "-", what, "-", "-", "-", "-", result]


def bench_rows(path: str, model_hint: str) -> list[list[str]]:
    data = _load(path)
    if data is None:
        return [["forward", model_hint, "tools/bench.py", "-", "-", "-", "-", "not run or failed (see its log)"]]
    rows = []
    for r in data["results"]:
        run = r["peer"] + (f" ({r['attention_impl']})" if r.get("attention_impl") else "")
        feed = r.get("host_feed_tokens_per_s")
        feed_s = f"{feed:,.0f}" if feed else "-"
        if "tokens_per_s" not in r:
            rows.append(["forward", r.get("model", model_hint), run, "-", "-", feed_s, "-",
                         f"skipped: {r.get('error', 'no timing')}"])
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        note = [f"{r['gflops_per_s'] / 1e3:,.1f} TFLOP/s ({r['pct_measured_peak']:.0%} of measured matmul peak)"]
        if r.get("min_cos_vs_ref") is not None:
            note.append(f"min cos {r['min_cos_vs_ref']:.5f}")
        rows.append(["forward", r["model"], run, f"{r['tokens_per_s']:,.0f}", mfu, feed_s, "-", "; ".join(note)])
    return rows


def train_rows(path: str | None) -> list[list[str]]:
    data = _load(path)
    if data is None:
        return [["train step", "-", "tools/bench_train.py", "-", "-", "-", "-", "not run or failed (see its log)"]]
    ok = [r for r in data["results"] if "tokens_per_s" in r]
    st = next((r for r in ok if r["peer"].startswith("st")), None)
    rows = []
    for r in data["results"]:
        what = f"batch {data['batch_size']}, max length {data['max_length']}"
        if "tokens_per_s" not in r:
            rows.append(["train step", data["model"], r["peer"], "-", "-", "-", "-", f"skipped: {r.get('error')}"])
            continue
        vs = f"{r['steps_per_s'] / st['steps_per_s']:.2f}x {st['peer']}'s steps/s; " if st else ""
        rows.append(["train step", data["model"], r["peer"], f"{r['tokens_per_s']:,.0f}", "-", "-",
                     f"{1e3 / r['steps_per_s']:,.1f}", f"{vs}{what}; final loss {r.get('final_loss') or 0:.4f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tests", default=None, help="the parity tests' pytest log")
    ap.add_argument("--tests-what", default="parity tests")
    ap.add_argument("--bench", nargs="*", default=[], help="tools/bench.py --json files, MODEL=PATH")
    ap.add_argument("--train", default=None, help="a tools/bench_train.py --json file")
    ap.add_argument("--device", default="")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows = [test_row(args.tests, args.tests_what)]
    peak = None
    for item in args.bench:
        model, _, path = item.rpartition("=")
        rows += bench_rows(path, model or "-")
        peak = peak or (_load(path) or {}).get("peak_tflops")
    rows += train_rows(args.train)
    lines = [f"### Device check, {time.strftime('%Y-%m-%d %H:%M')}: {args.device}",
             "",
             f"{args.note}. MFU: forward FLOPs on real tokens / "
             + (f"{peak:,.0f} TFLOP/s (dense bf16 peak)." if peak else "no peak known for this device."),
             "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
