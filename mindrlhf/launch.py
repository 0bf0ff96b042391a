"""Launch a stage process and stream its output.

One worker: ``python -m mindrlhf.stages.<stage> --spec S --out O``. More workers: MindSpore's own
launcher, ``msrun --worker_num=N --local_worker_num=M ... mindrlhf/stage_entry.py <stage> --spec S
--out O``; msrun writes each worker's output to ``<log_dir>/worker_<i>.log`` and echoes rank 0's
on stdout, which is streamed.

A run directory has one owner at a time: :func:`run_dir_lock` (an ``flock`` on ``run_dir/lock``,
released by the kernel when its holder dies, so a lock is never stale). The launcher owns the
process tree it starts: the stage processes watch the launcher's pid and exit when it is gone,
the launcher stops the whole tree (msrun, its scheduler and workers) when it is interrupted or
cancelled, and before a stage starts, processes still running from a dead launcher's attempt in
the same run directory are found by their spec path and stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .config import Config, ParallelConfig
from .data.store import atomic_write_bytes, drop_dir

ENTRY = Path(__file__).parent / "stage_entry.py"
REPO = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = "MINDRLHF_LAUNCHER"  # "<pid>:<start time>" of the process that owns a stage's tree


class StageFailed(RuntimeError):
    def __init__(
        self, stage: str, returncode: int, tail: list[str], peak_rss_mb: float | None = None
    ):
        self.stage, self.returncode, self.tail, self.peak_rss_mb = (
            stage,
            returncode,
            tail,
            peak_rss_mb,
        )
        super().__init__(
            f"stage {stage} {describe_exit(returncode, peak_rss_mb)}; last output:\n"
            + "\n".join(tail[-20:])
        )


def describe_exit(returncode: int, peak_rss_mb: float | None) -> str:
    if returncode == -signal.SIGKILL:
        import psutil

        total = psutil.virtual_memory().total / 2**30
        peak = f"peak RSS {peak_rss_mb / 1024:.1f} GB" if peak_rss_mb else "peak RSS unknown"
        return (
            f"was killed by SIGKILL, probably by the kernel's out-of-memory killer ({peak} of "
            f"{total:.1f} GB RAM)"
        )
    if returncode < 0:
        return f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    return f"exited with code {returncode}"


def msrun_bin() -> str:
    exe = Path(sys.executable).parent / "msrun"
    return str(exe) if exe.exists() else (shutil.which("msrun") or "msrun")


def msrun_log_dir(parallel: ParallelConfig, run_dir: Path) -> Path:
    log_dir = Path(parallel.log_dir)
    return log_dir if log_dir.is_absolute() else Path(run_dir) / log_dir


def stage_command(
    stage: str, spec: Path, out: Path, parallel: ParallelConfig, run_dir: Path
) -> list[str]:
    args = ["--spec", str(spec), "--out", str(out)]
    if parallel.worker_num <= 1:
        return [sys.executable, "-m", f"mindrlhf.stages.{stage}", *args]
    log_dir = msrun_log_dir(parallel, run_dir)
    return [
        msrun_bin(),
        f"--worker_num={parallel.worker_num}",
        f"--local_worker_num={parallel.local_worker_num}",
        f"--master_addr={parallel.master_addr}",
        f"--master_port={parallel.master_port}",
        f"--node_rank={parallel.node_rank}",
        f"--log_dir={log_dir}",
        "--join=True",
        f"--cluster_time_out={parallel.cluster_time_out}",
        str(ENTRY),
        stage,
        *args,
    ]


def stage_env(env: dict | None = None) -> dict:
    """The environment of a stage process: this checkout first on PYTHONPATH (msrun workers are
    started as scripts, so they must not import another installed copy), this interpreter's bin
    first on PATH (msrun starts workers with the ``python`` it finds), the launcher's identity."""
    import psutil

    penv = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "GLOG_v": os.environ.get("GLOG_v", "3"),
        **(env or {}),
    }
    penv["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), penv.get("PATH", "")])
    penv["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), penv.get("PYTHONPATH", "")] if p)
    penv[LAUNCHER_ENV] = f"{os.getpid()}:{psutil.Process().create_time()}"
    return penv


# ---- ownership of a run directory ----------------------------------------------------------------


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, log: Callable[[str], None] = print, poll_s: float = 60.0):
    """Hold ``run_dir`` exclusively. A second holder waits (saying for whom, every ``poll_s``);
    the kernel drops the lock of a dead holder, so a crashed run never blocks the next one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited % poll_s == 0:
                    log(
                        f"run directory {run_dir} is in use by {_lock_owner(path)}; waiting for "
                        "it to finish"
                    )
                time.sleep(1.0)
                waited += 1.0
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock_owner(path: Path) -> str:
    try:
        o = json.loads(path.read_text() or "{}")
        return f"pid {o['pid']} on {o['host']} (since {o['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def stage_processes(spec_path: Path) -> list:
    """Live processes started for this spec file (a stage, msrun, its scheduler and workers)."""
    import psutil

    needle, out = str(spec_path), []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if needle in cmd and p.pid != os.getpid():
            out.append(p)
    return out


def stop_processes(procs: list, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``grace_s``; returns the pids signalled."""
    import psutil

    alive = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            alive.append(p)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=grace_s)
    return [p.pid for p in alive]


def process_tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []


# ---- running a stage -----------------------------------------------------------------------------


def run_stage(
    stage: str,
    cfg: Config,
    inputs: dict,
    store_root: str | Path,
    run_dir: str | Path,
    log: Callable[[str], None] = print,
    env: dict | None = None,
    config_source: str = "<config>",
    lock: bool = True,
) -> dict:
    """Run one stage to completion; returns its result JSON (outputs, metrics, peak_rss_mb, ...).
    ``lock=False`` when the caller already holds :func:`run_dir_lock` on ``run_dir``."""
    from .preflight import preflight

    preflight(cfg, stage, config_source)
    run_dir = Path(
        run_dir
    ).resolve()  # absolute: the spec path also identifies the stage's processes
    with run_dir_lock(run_dir, log) if lock else contextlib.nullcontext():
        return _run_locked(stage, cfg, inputs, store_root, run_dir, log, env, config_source)


def _run_locked(stage, cfg, inputs, store_root, run_dir: Path, log, env, config_source) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = run_dir / "spec.json", run_dir / "result.json"
    orphans = stage_processes(spec_path)
    if orphans:
        pids = stop_processes(orphans)
        log(
            f"stopped {len(pids)} process(es) left running by an earlier launcher in {run_dir}: "
            f"{pids}"
        )
    spec = {
        "config": cfg.to_dict(),
        "config_source": config_source,
        "inputs": inputs,
        "store_root": str(Path(store_root).resolve()),
        "run_dir": str(run_dir.resolve()),
    }
    atomic_write_bytes(spec_path, json.dumps(spec, indent=1).encode())
    if out_path.exists():
        out_path.unlink()
    cmd = stage_command(stage, spec_path, out_path, cfg.parallel, run_dir)
    log("launch: " + " ".join(cmd))
    tail: list[str] = []

    def emit(line: str) -> None:
        line = line.rstrip()
        if line:
            tail.append(line)
            del tail[:-200]
            log(line)

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=stage_env(env),
        errors="replace",
        start_new_session=True,
    )
    try:  # under msrun --join, msrun itself echoes rank 0's log on stdout
        for line in proc.stdout:
            emit(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    except BaseException:  # interrupted or cancelled: the whole tree goes, workers included
        stop_processes(process_tree(proc.pid) + stage_processes(spec_path))
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    peak_mb = usage.ru_maxrss / 1024  # the stage and its reaped descendants (Linux: KiB)
    if rc != 0 or not out_path.exists():
        raise StageFailed(stage, rc if rc != 0 else -1, tail, peak_mb)
    result = json.loads(out_path.read_text())
    result["peak_rss_mb"] = round(peak_mb, 1)
    log(f"{stage}: peak RSS {peak_mb / 1024:.2f} GB")
    dropped = drop_working_checkpoints(run_dir)
    if dropped:
        log(f"{stage}: done; dropped {len(dropped)} working checkpoint(s) ({_gb(dropped):.2f} GB)")
    return result


def drop_working_checkpoints(run_dir: Path) -> list[tuple[Path, int]]:
    """A stage that finished has its outputs in the store: its working checkpoints (``ckpt-*``,
    with optimizer state: 3 GB a run for SmolLM2's GRPO) are only for resuming an attempt that
    died, so they go. ``(path, bytes)`` of each one dropped."""
    out = []
    for p in sorted(Path(run_dir).glob("ckpt-*")) + sorted(Path(run_dir).glob("*/ckpt-*")):
        if p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            drop_dir(p)
            out.append((p, size))
    return out


def _gb(dropped: list[tuple[Path, int]]) -> float:
    return sum(size for _, size in dropped) / 2**30


_watching: list[str] = []


def watch_launcher() -> None:
    """In a stage process: have a watchdog process SIGKILL this one when the launcher that owns
    it is gone (killed with SIGKILL, so it could not stop its tree), instead of it finishing and
    writing outputs nobody waits for."""
    owner = os.environ.get(LAUNCHER_ENV)
    if not owner or _watching:
        return
    _watching.append(owner)
    pid, created = owner.split(":", 1)
    subprocess.Popen(
        [sys.executable, "-m", "mindrlhf.watchdog", pid, created, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
