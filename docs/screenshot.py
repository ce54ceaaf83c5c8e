"""Screenshots of a running PIEscope dashboard for the README (after `make demo`).

    .venv/bin/python docs/screenshot.py [--dash http://127.0.0.1:8050] [--circuit ID] [--sweep ID]
                                        [--hierarchy ID] [--compare fc1,fc2,ec1,h1] [--edge-circuit ID]
                                        [--feature ID]

Writes docs/circuit.png, docs/kl_vs_k.png and, when the demo stored them, docs/supernodes.png
(the circuit grouped by a HAGD hierarchy), docs/compare.png (results of several methods) and
docs/edge_circuit.png (an edge circuit: heads and MLPs by layer, its kept edges) and
docs/feature.png (a feature page: examples, explanation, FADE scores by rater),
with headless Chromium (Debian's chromium and chromium-driver; `apt-get install -y chromium
chromium-driver`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,1500"]


def shoot(url: str, path: Path, wait_for: str, settle: float) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, wait_for)))
            time.sleep(settle)  # let Plotly finish drawing
            driver.save_screenshot(str(path))
        finally:
            driver.quit()
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dash", default="http://127.0.0.1:8050")
    parser.add_argument("--circuit", type=int, default=1)
    parser.add_argument("--sweep", type=int, default=1)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--hierarchy", type=int, default=None, help="HAGD hierarchy to group the circuit by")
    parser.add_argument("--compare", default=None, help="results to compare, e.g. fc1,fc2,ec1,ec2,h1")
    parser.add_argument("--edge-circuit", type=int, default=None, help="edge circuit to show")
    parser.add_argument("--feature", type=int, default=None, help="stored feature (id) whose page to show")
    args = parser.parse_args()
    out = ROOT / "docs"
    if args.hierarchy is not None:
        shoot(f"{args.dash}/circuit?id={args.circuit}&prompt=0&hierarchy={args.hierarchy}", out / "supernodes.png",
              "#circuit-tree .main-svg", args.settle)
    if args.compare:
        shoot(f"{args.dash}/compare?ids={args.compare}", out / "compare.png", "#compare-graphs .js-plotly-plot",
              args.settle)
    if args.feature is not None:
        shoot(f"{args.dash}/feature?id={args.feature}", out / "feature.png", "#feature-explanations", args.settle)
    if args.edge_circuit is not None:
        shoot(f"{args.dash}/edge-circuit?id={args.edge_circuit}", out / "edge_circuit.png", "#edge-graph .main-svg",
              args.settle)
    shoot(f"{args.dash}/circuit?id={args.circuit}&prompt=0", out / "circuit.png", ".js-plotly-plot .nodes, .js-plotly-plot",
          args.settle)
    shoot(f"{args.dash}/sweep?id={args.sweep}", out / "kl_vs_k.png", ".js-plotly-plot", args.settle)


if __name__ == "__main__":
    main()
