"""``python -m mindrlhf.watchdog LAUNCHER_PID LAUNCHER_START TARGET_PID``: a separate process that
SIGKILLs the stage process TARGET_PID once the launcher that owns it is gone (or exits when the
target is). A thread inside the stage could not do this: msrun's scheduler runs the stage entry
and then blocks inside MindSpore holding the interpreter lock, so no Python thread of its runs."""

import os
import signal
import sys
import time

import psutil


def same_process(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1e-3
    except psutil.NoSuchProcess:
        return False


def main(launcher: int, started: float, target: int, period_s: float = 1.0) -> None:
    while psutil.pid_exists(target):
        if not same_process(launcher, started):
            print(
                f"[watchdog] launcher pid {launcher} is gone: stopping stage process {target}",
                file=sys.stderr,
                flush=True,
            )
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(period_s)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
