"""The Prefect UI of a finished pipeline run, rendered by headless Debian Chromium (started by
the test) from a real local server: the flow-run page shows the run and its stage tasks, and a
screenshot is kept under out/ui/ for people to look at."""

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import tiny_overrides
from mindrlhf.config import load_config

pytestmark = pytest.mark.slow  # launches stage processes, servers or large models

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "ui"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail(
            "Debian chromium is not installed: `make test` installs it (apt-get install chromium)"
        )
    return exe


def render(url: str, tmp: Path, png: Path | None = None) -> str:
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'chrome-profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=25000",
    ]
    args += [f"--screenshot={png}"] if png else ["--dump-dom"]
    r = subprocess.run(args + [url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_flow_run_page_renders(server, tmp_path):
    url, env = server
    cfg = tmp_path / "tiny.yaml"
    base = load_config("demo").to_dict()
    over = tiny_overrides(tmp_path / "store")

    def merge(a, b):
        return {
            **a,
            **{
                k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                for k, v in b.items()
            },
        }

    cfg.write_text(yaml.safe_dump(merge(base, over)))
    mindrlhf = str(Path(sys.executable).parent / "mindrlhf")
    r = subprocess.run(
        [mindrlhf, "run", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "PREFECT_API_URL": url},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = httpx.post(f"{url}/flow_runs/filter", json={}).json()
    run = next(fr for fr in runs if fr["state_type"] == "COMPLETED")
    ui = url[: -len("/api")]
    dom = render(f"{ui}/runs/flow-run/{run['id']}", tmp_path)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "flow-run.html").write_text(dom)
    assert run["name"] in dom  # the SPA rendered this run's page from the API
    assert "Completed" in dom
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "flow-run.png"
    render(f"{ui}/runs/flow-run/{run['id']}", tmp_path, png)
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 1000)
    colours = len(img.resize((140, 100)).getcolors(maxcolors=140 * 100) or [])
    assert colours > 50, f"screenshot looks blank ({colours} colours)"
    # the run's lineage picture, as the UI shows the lineage-<name> artifact
    art = httpx.post(
        f"{url}/artifacts/latest/filter", json={"artifacts": {"key": {"any_": ["lineage-tiny"]}}}
    ).json()[0]
    page = f"{ui}/artifacts/artifact/{art['latest_id']}"  # the newest version under the key
    dom = render(page, tmp_path)
    (OUT / "lineage.html").write_text(dom)
    assert "data:image/svg+xml;base64," in dom  # the picture survived the UI's markdown renderer
    render(page, tmp_path, OUT / "lineage.png")
