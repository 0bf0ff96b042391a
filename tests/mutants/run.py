"""`make mutants`: each ``tests/mutants/*.patch`` is a realistic bug, applied to a copy of this
checkout; the tests it names must fail on it. Prints which mutant each test killed and which
survived, as JSON lines, and exits non-zero if any survived (or a patch no longer applies).

A patch file starts with a header, then the unified diff (``git diff`` output):

    # mutant: RoPE not applied to the key written into the compiled KV cache
    # tests: tests/test_generation.py::test_cached_decoding_of_a_sharp_model_equals_full_recompute

    .venv/bin/python tests/mutants/run.py [NAME ...] [--baseline]

``--baseline`` first runs every named test on the unmutated copy (they must pass there, or a
"kill" means nothing). Not part of `make test`: each mutant runs its tests in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def header(patch: Path) -> tuple[str, list[str]]:
    what, tests = "", []
    for line in patch.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        if key == "mutant":
            what = value.strip()
        elif key == "tests":
            tests += value.split()
    if not tests:
        raise SystemExit(f"{patch.name}: no '# tests:' line")
    return what, tests


def checkout_copy() -> Path:
    """This checkout as it is (tracked and untracked, not ignored), without .git and the venv."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dest = Path(tempfile.mkdtemp(prefix="mindrlhf-mutant-"))
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def run_tests(tree: Path, tests: list[str]) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "MINDRLHF_CACHE": os.environ.get("MINDRLHF_CACHE", str(REPO / ".cache")),
    }
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    return p.returncode, p.stdout + p.stderr


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("FAILED "):
            return line.split()[1]
    return ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", help="mutant names (patch file stems); all by default")
    ap.add_argument("--baseline", action="store_true", help="first check the tests pass unmutated")
    args = ap.parse_args()
    patches = sorted(HERE.glob("*.patch"))
    if args.names:
        patches = [p for p in patches if p.stem in args.names]
    survived, broken = [], []
    if args.baseline:
        tree = checkout_copy()
        tests = sorted({t for p in patches for t in header(p)[1]})
        rc, out = run_tests(tree, tests)
        shutil.rmtree(tree, ignore_errors=True)
        print(
            json.dumps({"baseline": "pass" if rc == 0 else "FAIL", "tests": len(tests)}), flush=True
        )
        if rc != 0:
            print(out[-3000:])
            return 2
    for patch in patches:
        what, tests = header(patch)
        tree = checkout_copy()
        t0 = time.time()
        try:
            applied = subprocess.run(
                ["git", "apply", "--whitespace=nowarn", str(patch)],
                cwd=tree,
                capture_output=True,
                text=True,
            )
            if applied.returncode != 0:
                broken.append(patch.stem)
                print(
                    json.dumps(
                        {
                            "mutant": patch.stem,
                            "result": "does not apply",
                            "why": applied.stderr.strip()[:300],
                        }
                    ),
                    flush=True,
                )
                continue
            rc, out = run_tests(tree, tests)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        if rc == 1:
            result = {"result": "killed", "by": first_failure(out)}
        elif rc == 0:
            result = {"result": "SURVIVED"}
            survived.append(patch.stem)
        else:  # collection error, crash: the mutant broke more than the behaviour it models
            result = {"result": f"pytest exit {rc}", "tail": out.strip().splitlines()[-1:]}
            broken.append(patch.stem)
        print(
            json.dumps(
                {"mutant": patch.stem, "what": what, **result, "s": round(time.time() - t0, 1)}
            ),
            flush=True,
        )
    print(json.dumps({"mutants": len(patches), "survived": survived, "broken": broken}))
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
