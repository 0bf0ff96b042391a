"""Launch a stage process and stream its output.

One worker: ``python -m mindrlhf.stages.<stage> --spec S --out O``. More workers: MindSpore's own
launcher, ``msrun --worker_num=N --local_worker_num=M ... mindrlhf/stages/<stage>.py --spec S --out O``;
msrun writes each worker's output to ``<log_dir>/worker_<i>.log`` and echoes rank 0's on stdout,
which is streamed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .config import Config, ParallelConfig
from .data.store import atomic_write_bytes

ENTRY = Path(__file__).parent / "stage_entry.py"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        super().__init__(f"stage {stage} exited with code {returncode}; last output:\n" + "\n".join(tail[-20:]))


def msrun_bin() -> str:
    exe = Path(sys.executable).parent / "msrun"
    return str(exe) if exe.exists() else (shutil.which("msrun") or "msrun")


def msrun_log_dir(parallel: ParallelConfig, run_dir: Path) -> Path:
    log_dir = Path(parallel.log_dir)
    return log_dir if log_dir.is_absolute() else Path(run_dir) / log_dir


def stage_command(stage: str, spec: Path, out: Path, parallel: ParallelConfig, run_dir: Path) -> list[str]:
    args = ["--spec", str(spec), "--out", str(out)]
    if parallel.worker_num <= 1:
        return [sys.executable, "-m", f"mindrlhf.stages.{stage}", *args]
    log_dir = msrun_log_dir(parallel, run_dir)
    return [msrun_bin(), f"--worker_num={parallel.worker_num}", f"--local_worker_num={parallel.local_worker_num}",
            f"--master_addr={parallel.master_addr}", f"--master_port={parallel.master_port}",
            f"--node_rank={parallel.node_rank}", f"--log_dir={log_dir}", "--join=True",
            f"--cluster_time_out={parallel.cluster_time_out}", str(ENTRY), stage, *args]


def run_stage(stage: str, cfg: Config, inputs: dict, store_root: str | Path, run_dir: str | Path,
              log: Callable[[str], None] = print, env: dict | None = None,
              config_source: str = "<config>") -> dict:
    """Run one stage to completion; returns its result JSON (outputs, metrics, ...)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = run_dir / "spec.json", run_dir / "result.json"
    spec = {"config": cfg.to_dict(), "config_source": config_source, "inputs": inputs,
            "store_root": str(Path(store_root).resolve()), "run_dir": str(run_dir.resolve())}
    atomic_write_bytes(spec_path, json.dumps(spec, indent=1).encode())
    if out_path.exists():
        out_path.unlink()
    cmd = stage_command(stage, spec_path, out_path, cfg.parallel, run_dir)
    log("launch: " + " ".join(cmd))
    penv = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOG_v": os.environ.get("GLOG_v", "3"), **(env or {})}
    # msrun starts workers with the `python` on PATH: make it this interpreter
    penv["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), penv.get("PATH", "")])
    tail: list[str] = []

    def emit(line: str) -> None:
        line = line.rstrip()
        if line:
            tail.append(line)
            del tail[:-200]
            log(line)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=penv,
                            errors="replace")
    try:  # under msrun --join, msrun itself echoes rank 0's log on stdout
        for line in proc.stdout:
            emit(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0 or not out_path.exists():
        raise StageFailed(stage, rc if rc != 0 else -1, tail)
    return json.loads(out_path.read_text())
