"""runtime.py's huge pages for training: when ``e5lite train`` restarts itself with them, and what they change."""

import os
import subprocess
import sys
import textwrap

import pytest

from e5lite import runtime
from e5lite.runtime import HUGE_PAGES, huge_pages_tunables

HERE = huge_pages_tunables({}) is not None  # glibc >= 2.35 on Linux with THP in madvise mode, as on the CI machine


@pytest.fixture
def thp(tmp_path, monkeypatch):
    """A stand-in for the kernel's THP mode file and glibc's version: (mode line, glibc version)."""
    def set_(mode: str, version: str = "2.36", libc: str = "glibc"):
        (tmp_path / "enabled").write_text(mode + "\n")
        monkeypatch.setattr(runtime, "THP_MODE", tmp_path / "enabled")
        monkeypatch.setattr(runtime.platform, "libc_ver", lambda: (libc, version))
        monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    return set_


def test_tunables_only_where_they_change_something(thp):
    thp("always [madvise] never")
    assert huge_pages_tunables({}) == HUGE_PAGES
    mine = "glibc.malloc.arena_max=2"
    assert huge_pages_tunables({"GLIBC_TUNABLES": mine}) == f"{mine}:{HUGE_PAGES}"
    assert huge_pages_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands
    assert huge_pages_tunables({"E5LITE_HUGE_PAGES": "0"}) is None  # switched off
    assert huge_pages_tunables({"E5LITE_HUGE_PAGES": "restarted"}) is None  # never a second restart
    thp("[always] madvise never")  # the kernel gives them to every large mapping already
    assert huge_pages_tunables({}) is None
    thp("always madvise [never]")
    assert huge_pages_tunables({}) is None
    thp("always [madvise] never", version="2.34")  # before the tunable existed
    assert huge_pages_tunables({}) is None
    thp("always [madvise] never", libc="", version="")  # musl and others
    assert huge_pages_tunables({}) is None


def test_no_thp_file_means_no_restart(thp, tmp_path, monkeypatch):
    thp("always [madvise] never")
    monkeypatch.setattr(runtime, "THP_MODE", tmp_path / "absent")
    assert huge_pages_tunables({}) is None


def _train_cli(tmp_path, env):
    """``e5lite train`` from a command line, on a model folder that does not exist: each start of the program
    prints its pid and GLIBC_TUNABLES, then the command fails on the model."""
    code = textwrap.dedent("""
        import os, sys
        print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
        from e5lite.cli import main
        sys.exit(main())
    """)
    records = tmp_path / "pairs.jsonl"
    records.write_text('{"query": "what is a generator", "positive": "A function that yields."}\n')
    return subprocess.run([sys.executable, "-c", code, "train", "--model", str(tmp_path / "no-model"), "--train",
                           str(records), "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_train_command_restarts_itself_once_with_huge_pages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "E5LITE_HUGE_PAGES")}
    p = _train_cli(tmp_path, env)
    starts = [line.split() for line in p.stdout.splitlines() if line.startswith("start")]
    assert p.returncode == 1 and "no-model" in p.stderr, p.stderr[-2000:]
    if HERE:
        assert len(starts) == 2 and starts[0][1] == starts[1][1], starts  # in place: the same process
        assert starts[0][2] == "None" and starts[1][2] == HUGE_PAGES
    else:
        assert len(starts) == 1, starts
    p = _train_cli(tmp_path, {**env, "E5LITE_HUGE_PAGES": "0"})  # switched off: one start, as it was
    assert p.returncode == 1 and [line.split()[2] for line in p.stdout.splitlines()] == ["None"]


@pytest.mark.skipif(not HERE, reason="no glibc >= 2.35 with transparent huge pages on request here")
def test_huge_pages_spare_the_page_faults_of_a_fresh_large_buffer():
    """What the restart is for: a large buffer allocated, written and freed, again and again (as XLA:CPU
    does with a step's buffers), faults in every 4 KiB page each time, but with the tunable only each 2 MiB."""
    code = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)
        faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        before = faults()
        for _ in range(5):  # 128 MiB, written in full, freed (numpy would ask for huge pages itself)
            p = libc.malloc(1 << 27)
            ctypes.memset(p, 1, 1 << 27)
            libc.free(p)
        print((faults() - before) // 5)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",)}
    plain, huge = (int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env={**env, **extra}).stdout) for extra in ({}, {"GLIBC_TUNABLES": HUGE_PAGES}))
    assert plain >= 30_000  # 32,768 pages of 4 KiB
    assert huge <= plain // 20, (plain, huge)


@pytest.mark.parametrize("how", ["stdin", "argv rewritten"])
def test_no_restart_where_the_command_line_cannot_start_it_again(how):
    """A script read from stdin would find stdin empty the second time; a program that set sys.argv itself
    would start again from the top: both carry on without huge pages."""
    code = textwrap.dedent(f"""
        import os, sys
        print("start", os.environ.get("GLIBC_TUNABLES"), flush=True)
        if {how == "argv rewritten"}:
            sys.argv = ["e5lite", "train", "--model", "m"]
        from e5lite.runtime import restart_with_huge_pages
        restart_with_huge_pages()
        print("carried on")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "E5LITE_HUGE_PAGES")}
    cmd = [sys.executable, "-", "train"] if how == "stdin" else [sys.executable, "-c", code, "train"]
    p = subprocess.run(cmd, input=code if how == "stdin" else None, capture_output=True, text=True, env=env,
                       timeout=120, check=True)
    assert p.stdout.splitlines() == ["start None", "carried on"], p.stdout


def test_distributed_without_a_cluster_says_what_to_pass(tiny_dir, tmp_path, monkeypatch, capsys):
    """``embed --distributed`` on a plain machine: one line naming --coordinator/--num-processes/--process-id and
    where --distributed works, not JAX's bare "coordinator_address should be defined." (JAX raises that after
    its cluster detection; it is stood in for here, since this test process has started JAX already)."""
    import jax

    from e5lite.cli import main

    def no_cluster(coordinator_address=None, **kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # gloo: nothing to switch in this test
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out/"), "--distributed"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("e5lite: error: --distributed found no cluster"), err
    assert all(flag in err for flag in ("--coordinator HOST:PORT", "--num-processes", "--process-id", "SLURM"))
