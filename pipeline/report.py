"""report.html and its PNG plots, from the evaluation rows and the training history.

Pure rendering: returns bytes, so the caller decides where they go (a local folder or S3).
The page references its plots by relative name, so the folder can be copied anywhere.
"""
from __future__ import annotations

import html
import io
import json

RECALL_PNG = "report-recall.png"
LOSS_PNG = "report-loss.png"
# report row field -> its column head in text tables
TABLE_COLUMNS = {"method": "method", "bytes_per_vector": "B/vec", "nlist": "nlist",
                 "nprobe": "nprobe", "recall_at_10": "R@10", "recall_at_100": "R@100",
                 "mrr_at_10": "MRR@10", "label_recall_at_10": "labelR@10",
                 "qps_1thread": "QPS(1 thread)", "codes_per_query": "codes/query"}


def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return plt, fig, axes[0]


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def recall_plot(rows: list[dict]) -> bytes:
    """recall@10 and recall@100 against nprobe, one line per method."""
    plt, fig, axes = _figure(11, 4, 2)
    for ax, key, label in ((axes[0], "recall_at_10", "recall@10 (10@10)"),
                           (axes[1], "recall_at_100", "recall@100 (100@100)")):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["nprobe"], r[key]) for r in rows
                         if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method,
                        linestyle="-" if method.startswith("distilled") else "--")
        ax.set_xscale("log", base=2)
        probes = sorted({r["nprobe"] for r in rows})
        ax.set_xticks(probes, [str(p) for p in probes])
        ax.minorticks_off()
        ax.set(xlabel="nprobe", ylabel=label, title=f"{label} against nprobe")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(plt, fig)


def loss_plot(history: list[dict], warm_val: float | None = None) -> bytes:
    """Per-step training loss across epochs, and validation recall at the warm start (step 0)
    and after each epoch."""
    plt, fig, axes = _figure(8, 4)
    ax = axes[0]
    x0 = 0
    for h in history:
        losses = h.get("step_losses") or [h["loss"]]
        ax.plot(range(x0, x0 + len(losses)), losses, color="tab:blue", linewidth=1)
        x0 += len(losses)
        ax.axvline(x0, color="grey", alpha=0.3)
    ax.set(xlabel="step", ylabel="distillation loss per query", title="training")
    ax.grid(alpha=0.3)
    if history:
        ax2 = ax.twinx()
        ends, vals, x = [], [], 0
        if warm_val is not None:
            ends, vals = [0], [warm_val]
        for h in history:
            x += len(h.get("step_losses") or [0])
            ends.append(x)
            vals.append(h["val_recall"])
        ax2.plot(ends, vals, "o:", color="tab:orange", label="validation recall@10")
        ax2.set_ylabel("validation recall@10", color="tab:orange")
        ax2.legend(loc="upper right", fontsize=8)
    return _png(plt, fig)


SPEED_FORMATS = {"qps_1thread": "{:,.0f}", "codes_per_query": "{:,.0f}"}


def _table(head: list[str], body: list[list], formats: list[str] | None = None) -> str:
    """An HTML table; `formats` gives each column's float format ("{:.4f}" by default).
    Text columns are left-aligned, numbers right-aligned."""
    formats = formats or ["{:.4f}"] * len(head)

    def cell(v, fmt):
        if v is None:
            return "<td>-</td>"
        if isinstance(v, float):
            return f"<td>{fmt.format(v)}</td>"
        if isinstance(v, int):
            return f"<td>{v:,}</td>"
        return f"<td class='text'>{html.escape(str(v))}</td>"

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(cell(v, f) for v, f in zip(row, formats)) + "</tr>"
            for row in body]
    return "\n".join(out) + "</table>"


def _gains(rows: list[dict]) -> list[str]:
    """A table of each distilled method's relative gain over its faiss baseline (the method
    of the same name after its first dash) at every nprobe both were searched at."""
    by = {(r["method"], r["nprobe"]): r for r in rows}
    body = []
    for (method, nprobe), r in sorted(by.items()):
        base = by.get(("faiss-" + method.split("-", 1)[1], nprobe))
        if not method.startswith("distilled-") or base is None:
            continue
        gain = [None if not (r.get(k) and base.get(k)) else f"{r[k] / base[k] - 1:+.1%}"
                for k in ("recall_at_10", "recall_at_100", "mrr_at_10", "label_recall_at_10")]
        body.append([method, nprobe, *gain])
    if not body:
        return []
    return ["<h3>Distilled over faiss, at the same nprobe</h3>",
            _table(["method", "nprobe", "R@10", "R@100", "MRR@10", "labelR@10"], body)]


def render(rows: list[dict], train_info: dict | None, wall_seconds: dict, summary: dict,
           devices: dict | None = None) -> dict:
    """Returns {file name: bytes}: report.html plus the PNGs it shows.

    summary: {"index": URI, "vectors": n, "bytes_per_vector": b, "config_hash": h}.
    """
    files = {RECALL_PNG: recall_plot(rows)}
    cols = list(TABLE_COLUMNS)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Distilled VQ report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right;font-variant-numeric:tabular-nums}"
        "td.text{text-align:left}th{background:#f3f3f3}img{max-width:100%}</style>",
        "</head><body><h1>Distilled vector quantization: run report</h1>",
        _table(["index", "vectors", "bytes/vector", "config hash"],
               [[summary["index"], summary["vectors"], summary["bytes_per_vector"],
                 summary["config_hash"]]]),
        "<h2>Retrieval quality and speed</h2>",
        "<p>recall@k is the overlap with the exact top-k; MRR and label recall use the labels "
        "when given. QPS is the evaluation's own single-thread search of up to "
        "1,000 queries on the machine that ran it (every part searched in turn), and "
        "codes/query the codes those searches scanned: pick nprobe for a latency budget "
        "from them.</p>",
        _table([TABLE_COLUMNS[c] for c in cols], [[r.get(c) for c in cols] for r in rows],
               [SPEED_FORMATS.get(c, "{:.4f}") for c in cols]),
        *_gains(rows),
        f"<img src='{RECALL_PNG}' alt='recall against nprobe'>",
    ]
    if train_info and train_info.get("history"):
        files[LOSS_PNG] = loss_plot(train_info["history"], train_info.get("warm_val"))
        hist = train_info["history"]
        parts += [
            "<h2>Training</h2>",
            f"<p>validation recall@10: warm start {train_info['warm_val']:.4f}, "
            f"best {train_info['best_val']:.4f}"
            f"{'' if train_info['best_val'] > train_info['warm_val'] else ' (warm start kept)'}"
            "</p>",
            _table(["epoch", "loss", "val recall@10", "seconds", "queries/s/worker"],
                   [[h["epoch"], h["loss"], h["val_recall"], h["seconds"],
                     h["queries_per_s_per_worker"]] for h in hist],
                   ["", "{:.3f}", "{:.4f}", "{:.1f}", "{:.0f}"]),
            f"<img src='{LOSS_PNG}' alt='training loss'>",
        ]
    parts += ["<h2>Stage seconds</h2>",
              _table(list(wall_seconds), [[float(v) for v in wall_seconds.values()]],
                     ["{:.1f}"] * len(wall_seconds))]
    if devices:
        parts += ["<h2>Where each stage ran</h2>",
                  _table(["stage", "device; library"], [[s, d] for s, d in devices.items()],
                         ["", ""])]
    parts += ["</body></html>"]
    files["report.html"] = "\n".join(parts).encode()
    return files


def format_table(rows: list[dict], columns: dict | None = None) -> str:
    """The report rows as an aligned text table (None prints as -); `columns` maps row keys
    to headers (default TABLE_COLUMNS)."""
    columns = columns or TABLE_COLUMNS

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else \
            f"{v:.0f}" if isinstance(v, float) else str(v)

    table = [list(columns.values())] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_files(rows: list[dict], train_info: dict | None, wall_seconds: dict,
                 summary: dict, devices: dict | None = None) -> dict:
    """{file name: bytes}: report.json ({"rows", "wall_seconds", "devices"}), report.html and
    its PNGs."""
    files = {"report.json": json.dumps({"rows": rows, "wall_seconds": wall_seconds,
                                        "devices": devices or {}}, indent=2).encode()}
    files.update(render(rows, train_info, wall_seconds, summary, devices))
    return files
