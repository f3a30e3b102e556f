"""Screenshots of the MLflow UI over a finished sweep, taken in headless Chromium: what a researcher sees.

    python -m kdray.sweep                                  # a demo sweep into ./mlflow.db (a few minutes)
    python benchmarks/mlflow_screens.py                    # -> docs/screens/*.png
    python benchmarks/mlflow_screens.py --tracking-uri sqlite:////tmp/x/mlflow.db --sweep <id> --out /tmp/shots

It starts `mlflow ui` on 127.0.0.1 (a free port) over the store, waits for its /health, and opens five pages of
the sweep (the latest one that is not a smoke test, or --sweep) in headless Chromium through Playwright, each
given --wait-ms to render. The browser starts as a returning user would have left it: the MLflow Assistant panel
closed (it takes a quarter of the window on a first visit), the sweep's parent run expanded in the run table
(its row's expander clicked).

| file | page |
|---|---|
| runs.png | the experiment's run table (the sweep's parent run and its trials) |
| parent.png | the sweep's parent run: its description, best mIoU, the best trial's parameters and link |
| predictions.png | the best trial's last `predictions` picture, opened on its Artifacts tab |
| model.png | the best trial's logged model (the student as an MLflow model) |
| compare.png | the compare view of the confirmation stage's runs |

The PNGs are shrunk to --width pixels and quantised to 128 colours, small enough to commit. Needs a Chromium
(Debian: `apt-get install chromium`) and the `screens` extra (`pip install -e '.[screens]'`: Playwright's Python
client, which drives that Chromium; no browser is downloaded). On a machine whose servers must stay on
loopback, run the whole script inside such a network namespace: the UI, the browser and
the script talk over 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from mlflow.tracking import MlflowClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray import contract  # noqa: E402
from kdray.reporting.runs import find_experiment, find_sweep, search_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until `url` answers 200; a server that exits first, or the timeout, is an error with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with code {server.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer {url} within {timeout_s:.0f} s")


def pages(client: MlflowClient, experiment: str, sweep_id: str | None) -> dict[str, tuple]:
    """File stem -> (the UI's route after `#`, a text that shows once the page has its data, what to do on
    it before the screenshot) for the sweep's five pages."""
    experiment_id = find_experiment(client, experiment)
    sweep = find_sweep(client, experiment_id, experiment, sweep_id)
    sweep_id = sweep.data.tags[contract.SWEEP_ID]
    trials = search_all(client, experiment_id, f"tags.`{contract.SWEEP_ID}` = '{sweep_id}' "
                                               f"and tags.`{contract.KIND}` = 'trial'")
    scored = [run for run in trials if contract.VAL_MIOU in run.data.metrics]
    if not scored:
        raise SystemExit(f"sweep {sweep_id}: no trial run has {contract.VAL_MIOU}; screenshot a finished sweep")
    best = max(scored, key=lambda run: run.data.metrics[contract.VAL_MIOU])
    confirmed = [run.info.run_id for run in trials if run.data.tags.get(contract.STAGE) == "confirm"]
    compared = confirmed or [run.info.run_id for run in scored]
    parent, trial = sweep.info.run_name, best.info.run_name
    view = "?workflowType=machine_learning"  # MLflow 3.17's sidebar switch, set to Model training (not GenAI)
    routes = {
        "runs": (f"/experiments/{experiment_id}/runs{view}", parent, expand_row(parent)),
        "parent": (f"/experiments/{experiment_id}/runs/{sweep.info.run_id}{view}", parent, None),
        "predictions": (f"/experiments/{experiment_id}/runs/{best.info.run_id}/artifacts{view}", trial,
                        open_artifact(latest_predictions(client, best.info.run_id))),
        "model": None,
        "compare": ("/compare-runs?runs=" + quote(json.dumps(compared)) + "&experiments="
                    + quote(json.dumps([experiment_id])) + view.replace("?", "&"), "Comparing", None),
    }
    models = [output.model_id for output in (best.outputs.model_outputs if best.outputs else [])]
    if models:
        routes["model"] = (f"/experiments/{experiment_id}/models/{models[-1]}{view}", "model", None)
    else:
        print(f"the best trial {trial} logged no model: no model.png", file=sys.stderr)
        del routes["model"]
    return routes


def prepared_storage() -> str:
    """The init script that leaves the UI as a returning user has it: the Assistant panel closed, its
    first-visit auto-open spent (the MLflow 3.17 UI's own localStorage entries)."""
    return """
        localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
        localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
    """


def take(page, url: str, path: Path, wait_ms: int, ready_text: str, then=None) -> None:
    """Open `url`, wait until `ready_text` shows (at most a minute: the first page also loads the UI's
    scripts), run `then(page)` if given (a click, a filter), give it `wait_ms` to settle, and save the window."""
    page.goto(url)
    try:
        page.get_by_text(ready_text, exact=False).first.wait_for(timeout=60_000)
    except Exception:  # Playwright's TimeoutError: take what is there, and say so
        print(f"{path.name}: {ready_text!r} did not show within a minute; saved as it is", file=sys.stderr)
    if then is not None:
        then(page)
    page.wait_for_timeout(wait_ms)
    page.screenshot(path=str(path))


def expand_row(name: str):
    """Click the expander of the run table's row named `name` (a parent run: its children appear under it)."""
    def click(page) -> None:
        expander = page.locator('[role="row"]', has_text=name).first.locator("button")
        if expander.count():
            expander.first.click()
    return click


def latest_predictions(client: MlflowClient, run_id: str) -> str | None:
    """The artifact path of the run's last `predictions` picture (MLflow keeps each step's image under
    `images/<key>+step+<step>+...png`, next to a compressed copy), or None when it logged none."""
    key = contract.PREDICTIONS_IMAGE_KEY
    found = [a.path for a in client.list_artifacts(run_id, "images")
             if a.path.split("/")[-1].startswith(f"{key}+step+") and a.path.endswith(".png")]
    return max(found, key=lambda path: int(path.split("/")[-1].split("+")[2]), default=None)


def open_artifact(path: str | None):
    """On a run's Artifacts tab, open the folders down to `path` and select it: the UI previews the image whole
    (the chart card of an image key in MLflow 3.17 shows the run's parameters over it, not the picture)."""
    def click(page) -> None:
        if path is None:
            print(f"no predictions picture to open on {page.url}", file=sys.stderr)
            return
        *folders, name = path.split("/")
        for folder in folders:
            page.get_by_text(folder, exact=True).first.click()
            page.wait_for_timeout(1000)
        page.get_by_text(name, exact=False).first.click()
    return click


def shrink(path: Path, width: int, colours: int = 128) -> None:
    """Resize to `width` pixels wide (never up) and quantise to `colours`: screenshots to commit."""
    image = Image.open(path).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}",
                        help="the store of a finished sweep (default: sqlite:///<cwd>/mlflow.db, the demo's)")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--sweep", default=None, help="sweep id (default: the latest that is not a smoke test)")
    parser.add_argument("--out", default=str(REPO / "docs" / "screens"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or "chromium")
    parser.add_argument("--window", default="1600x1000", help="browser window, WIDTHxHEIGHT")
    parser.add_argument("--width", type=int, default=1200, help="width of the saved PNGs, pixels")
    parser.add_argument("--wait-ms", type=int, default=4000,
                        help="time each page gets to settle once its data shows, ms")
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None and not Path(args.chromium).is_file():
        raise SystemExit(f"--chromium: {args.chromium!r} not found (Debian: apt-get install chromium)")
    size = tuple(int(v) for v in args.window.lower().split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    routes = pages(MlflowClient(args.tracking_uri), args.experiment, args.sweep)
    from playwright.sync_api import sync_playwright

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"{base}/health", server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": size[0], "height": size[1]})
            context.add_init_script(prepared_storage())
            page = context.new_page()
            print("| file | route | KiB |\n|---|---|---:|")
            for stem, (route, ready_text, then) in routes.items():
                path = out / f"{stem}.png"
                take(page, f"{base}/#{route}", path, args.wait_ms, ready_text, then)
                shrink(path, args.width)
                print(f"| {path} | #{route.split('?')[0]} | {path.stat().st_size / 1024:.0f} |")
            browser.close()
    finally:  # the UI's uvicorn and job-runner children too: the whole process group
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
