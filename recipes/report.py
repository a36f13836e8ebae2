"""Renders one run's curves and sample grids from MLflow into a PNG (+ HTML page).

    python recipes/report.py --run RUN_ID --tracking-uri sqlite:///runs/tiny-dpo/mlflow.db --out report.png
"""

from __future__ import annotations

import argparse

from diffalign.report import render_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="MLflow run id")
    p.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///runs/tiny-dpo/mlflow.db")
    p.add_argument("--out", default="report.png")
    p.add_argument("--html", default=None, help="also write an HTML page here")
    a = p.parse_args()
    print(render_report(a.run, a.tracking_uri, a.out, a.html))


if __name__ == "__main__":
    main()
