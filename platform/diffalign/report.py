"""Renders one MLflow run into a single PNG (and an HTML page) a person can look at:
loss and accuracy curves, held-out accuracy, reward-model scores, reward margin, gradient norm, learning rate,
reference divergence/version, per-timestep-interval accuracy, guard events and the latest
sample grid."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

CURVES = [
    ("loss", "loss"),
    ("implicit_acc", "train implicit accuracy"),
    ("heldout.implicit_acc", "held-out implicit acc"),
    ("margin_mean", "reward margin (mean)"),
    ("grad_norm", "grad norm (pre-clip)"),
    ("lr", "learning rate"),
    ("ref.divergence", "KL(ref||init) estimate"),
    ("ref.version", "reference version"),
    ("pairs_per_s", "throughput (pairs/s)"),
]


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in hist], [m.value for m in hist]


def _latest_artifact(client, run_id: str, folder: str, tmp: str) -> str | None:
    files = sorted(a.path for a in client.list_artifacts(run_id, folder) if a.path.endswith(".png"))
    return client.download_artifacts(run_id, files[-1], tmp) if files else None


def render_report(
    run_id: str, tracking_uri: str, out_png: str | Path, out_html: str | Path | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    keys = set(run.data.metrics)
    curves = [(k, t) for k, t in CURVES if k in keys]
    # Periodic reward-model scores (diffalign.train.reward_eval), one curve per scorer.
    curves += [
        (k, f"reward score: {k.split('.', 1)[1]} (fixed prompts, seeds)")
        for k in sorted(keys)
        if k.startswith("score.")
    ]
    bins = sorted((k for k in keys if k.startswith("bins.acc_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    events = [k for k in keys if k.startswith("events.")]
    with tempfile.TemporaryDirectory() as tmp:
        grid = _latest_artifact(client, run_id, "samples", tmp)
        bins_plot = _latest_artifact(client, run_id, "plots", tmp)
        n_panels = len(curves) + (1 if bins else 0)
        cols = 3
        rows = (n_panels + cols - 1) // cols + (1 if grid else 0)
        fig = plt.figure(figsize=(4.2 * cols, 3.0 * rows))
        params = run.data.params
        title = (
            f"run {run_id[:8]} — objective={params.get('objective.name', '?')} "
            f"reference={params.get('reference.strategy', '?')} model={params.get('model.family', '?')}"
        )
        fig.suptitle(title, fontsize=11)
        i = 0
        for key, label in curves:
            i += 1
            ax = fig.add_subplot(rows, cols, i)
            steps, values = _history(client, run_id, key)
            ax.plot(steps, values, lw=1.2)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            for ev in events:
                for s in _history(client, run_id, ev)[0]:
                    ax.axvline(s, color="red", lw=0.8, ls="--")
        if bins:
            i += 1
            ax = fig.add_subplot(rows, cols, i)
            vals = [run.data.metrics[k] for k in bins]
            ax.bar([k.rsplit("_", 1)[1] for k in bins], vals, color="tab:green")
            ax.axhline(0.5, color="gray", ls="--", lw=0.8)
            ax.set_ylim(0, 1)
            ax.set_title("implicit acc per t interval (0 = least noisy)", fontsize=9)
        if grid:
            ax = fig.add_subplot(rows, 1, rows)
            ax.imshow(mpimg.imread(grid))
            ax.set_axis_off()
            ax.set_title("latest sample grid (fixed prompts and seeds)", fontsize=9)
        if events:
            fig.text(
                0.01,
                0.01,
                "red dashed lines: guard events (" + ", ".join(e.split(".", 1)[1] for e in events) + ")",
                fontsize=8,
                color="red",
            )
        fig.tight_layout(rect=(0, 0.02, 1, 0.96))
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=80)
        plt.close(fig)
        if out_html:
            rows_html = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v:.5g}</td></tr>"
                for k, v in sorted(run.data.metrics.items())
            )
            extra = f'<h2>timestep intervals</h2><img src="{Path(bins_plot).name}">' if bins_plot else ""
            if bins_plot:
                Path(out_html).parent.mkdir(parents=True, exist_ok=True)
                Path(Path(out_html).parent / Path(bins_plot).name).write_bytes(Path(bins_plot).read_bytes())
            Path(out_html).write_text(
                f"<html><body><h1>{html.escape(title)}</h1><img src='{out_png.name}'>{extra}"
                f"<h2>last values</h2><table>{rows_html}</table></body></html>"
            )
    return out_png
