"""Script entry for launchers that take a file path rather than a module (msrun):
``msrun ... mindrlhf/stage_entry.py <stage> --spec S --out O`` runs ``mindrlhf.stages.<stage>``.

The launcher watch starts before the stage module is imported: msrun runs this same script as
its scheduler, which blocks inside MindSpore from import on and must still exit with the
launcher."""

import os
import runpy
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]  # no shadowing by our own files
    from mindrlhf.launch import watch_launcher

    watch_launcher()
    stage = sys.argv[1]
    sys.argv = [f"mindrlhf.stages.{stage}", *sys.argv[2:]]
    runpy.run_module(f"mindrlhf.stages.{stage}", run_name="__main__", alter_sys=True)
