"""What a training run logs: metrics.jsonl (one JSON object per logged step), TensorBoard or Weights & Biases
scalars and validation grids as report_to says, and loss.png, a small loss curve drawn with PIL."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def wandb_id(out: Path, resumed: bool) -> str:
    """The Weights & Biases run id of the run in `out`: a resumed run logs on in the run it continues (its id is
    kept in out/wandb_id), a new run gets a new id (a new run may reuse an output_dir that holds no checkpoint)."""
    import secrets

    path = out / "wandb_id"
    if resumed and path.is_file():
        return path.read_text().strip()
    run_id = "if-tune-" + secrets.token_hex(6)
    path.write_text(run_id + "\n")
    return run_id


class Metrics:
    """metrics.jsonl (one JSON object per line), and TensorBoard scalars and grids with report_to='tensorboard'.
    A resumed run first drops what the interrupted one logged after its checkpoint (`resumed_at`), so each step is
    in the log once; a new run starts the log afresh."""

    def __init__(self, out: Path, report_to: str, resumed_at: int | None = None, config: dict | None = None):
        path = out / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            lines = path.read_text().splitlines(keepends=True)
            rows = [line for line in lines if json.loads(line)["step"] <= resumed_at]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(rows))
            os.replace(tmp, path)
        self.file, self.tb, self.wandb = open(path, "a" if resumed_at is not None else "w"), None, None
        if report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise ImportError("report_to='wandb' needs Weights & Biases: pip install wandb") from e
            self.wandb = wandb.init(project="if-tune", name=out.name, dir=str(out), config=config,
                                    resume="allow", id=wandb_id(out, resumed_at is not None))
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("report_to='tensorboard' needs TensorBoard: pip install tensorboard") from e
            purge = 0 if resumed_at is None else resumed_at + 1  # TensorBoard hides events logged from this on
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n"), self.file.flush()
        if self.tb:
            for key in row.keys() - {"step"}:
                self.tb.add_scalar(key, row[key], row["step"])
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def image(self, png: Path, step: int) -> None:
        if self.tb:
            import numpy as np
            from PIL import Image

            self.tb.add_image("validation", np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({"validation": wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_losses(metrics_path: Path, png: Path, size=(640, 360)) -> None:
    """A small loss curve (a moving average over the logged steps) drawn with PIL, no plotting library."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in open(metrics_path)]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if len(pts) < 2:
        return
    k = max(1, len(pts) // 50)
    window = [[v for _, v in pts[max(0, i - k + 1) : i + 1]] for i in range(len(pts))]
    smooth = [(s, sum(w) / len(w)) for (s, _), w in zip(pts, window)]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]  # fixed t and noise: orange dots
    (W, H), m = size, 40
    x0, x1 = min(s for s, _ in smooth + held), max(s for s, _ in smooth + held)
    lo, hi = min(v for _, v in smooth + held), max(v for _, v in smooth + held)
    ln = lambda v: math.log(max(v, 1e-12))

    def xy(s, v):  # log scale: the first steps' loss is often 100x the last
        y = (ln(v) - ln(lo)) / max(1e-12, ln(hi) - ln(lo))
        return m + (s - x0) / max(1, x1 - x0) * (W - 2 * m), H - m - y * (H - 2 * m)

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline="gray")
    d.line([xy(s, v) for s, v in smooth], fill="navy", width=2)
    for x, y in (xy(s, v) for s, v in held):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="darkorange")
    title = f"training loss, log scale (moving average of {k}): {smooth[-1][1]:.4f} at step {smooth[-1][0]}"
    d.text((m, 8), title + (f"; held-out loss (dots): {held[-1][1]:.4f}" if held else ""), fill="black")
    d.text((m, H - m + 8), f"step {x0}", fill="black"), d.text((W - m - 60, H - m + 8), f"step {x1}", fill="black")
    d.text((4, m), f"{hi:.3g}", fill="black"), d.text((4, H - m - 10), f"{lo:.3g}", fill="black")
    img.save(png)
