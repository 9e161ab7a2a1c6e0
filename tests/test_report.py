"""report.html and its plots, from rows and a training history."""
from pipeline import report


def test_render_writes_html_and_plots():
    rows = [{"method": m, "bytes_per_vector": 8, "nlist": 16, "nprobe": p,
             "recall_at_10": r + p / 100, "recall_at_100": 0.9, "mrr_at_10": None,
             "label_recall_at_10": None}
            for m, r in (("faiss-ivf-opq", 0.3), ("distilled-ivf-opq", 0.4)) for p in (1, 4)]
    history = [{"epoch": e, "loss": 0.1 / e, "val_recall": 0.4 + e / 100, "seconds": 1.0,
                "queries_per_s_per_worker": 100.0, "step_losses": [0.2, 0.1, 0.05]}
               for e in (1, 2)]
    train = {"history": history, "warm_val": 0.35, "best_val": 0.42}
    files = report.render(rows, train, {"train": 3.5, "merge": 1.25},
                          {"index": "s3://b/run/index/index.index", "vectors": 10,
                           "bytes_per_vector": 8, "config_hash": "abc"})
    assert set(files) == {"report.html", report.RECALL_PNG, report.LOSS_PNG}
    for name in (report.RECALL_PNG, report.LOSS_PNG):
        assert files[name][:8] == b"\x89PNG\r\n\x1a\n" and len(files[name]) > 5000
    html = files["report.html"].decode()
    for text in (report.RECALL_PNG, report.LOSS_PNG, "distilled-ivf-opq", "faiss-ivf-opq",
                 "warm start 0.3500", "best 0.4200", "s3://b/run/index/index.index",
                 "<td>3.5</td>", "<td>1.2</td>"):
        assert text in html, text


def test_render_without_training_history():
    files = report.render([], None, {}, {"index": "x", "vectors": 0, "bytes_per_vector": 8,
                                         "config_hash": "h"})
    assert report.LOSS_PNG not in files and "<h2>Training</h2>" not in \
        files["report.html"].decode()
