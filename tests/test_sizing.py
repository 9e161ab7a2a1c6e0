"""Sizes from the data and a budget (pipeline.index.sizing), and the dry run that prints them."""
import os

import faiss
import numpy as np
import pytest

from pipeline.config import IndexConfig
from pipeline.errors import InputError
from pipeline.index import sizing


@pytest.mark.parametrize("n, sample, want", [
    (1_000_000, 1_000_000, 4096),  # 4 sqrt(n) = 4,000 -> 4,096
    (1_000_000, 39_000, 512),  # at least 39 sample vectors a list: 1,000 at most -> 512
    (60_231, 60_000, 1024),
    (100, 100, 2),
    (1, 1, 1),
])
def test_auto_nlist(n, sample, want):
    assert sizing.auto_nlist(n, sample) == want


def test_index_bytes_is_what_faiss_writes():
    """The estimate against the serialized size of the same index, filled."""
    rng = np.random.default_rng(0)
    n, d = 5000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    ix = IndexConfig(nlist=16, M=8, nbits=8, opq=True)
    index = faiss.index_factory(d, "OPQ8,IVF16,PQ8")
    index.train(x)
    index.add(x)
    written = len(faiss.serialize_index(index))
    assert abs(sizing.index_bytes(n, d, ix) - written) < 0.02 * written + 4096


def test_the_budget_picks_the_largest_code_that_fits():
    n, d = 1_000_000, 128
    changes, notes = sizing.resolve(IndexConfig(nlist=1024, M="auto", memory_budget="30MB"),
                                    n, d, 100_000)
    M = changes["index.M"]
    fits = sizing.index_bytes(n, d, IndexConfig(nlist=1024, M=M))
    assert fits <= 30e6 and d % M == 0 and "index.M: auto" in notes[0]
    bigger = [m for m in range(M + 1, 129) if d % m == 0]
    assert sizing.index_bytes(n, d, IndexConfig(nlist=1024, M=bigger[0])) > 30e6
    with pytest.raises(InputError, match="over index.memory_budget=10MB"):
        sizing.resolve(IndexConfig(nlist=1024, M=16, memory_budget="10MB"), n, d, 100_000)
    with pytest.raises(InputError, match="raise the budget"):
        sizing.resolve(IndexConfig(nlist=1024, M="auto", memory_budget="1MB"), n, d, 100_000)


def test_auto_M_without_a_budget_is_refused():
    with pytest.raises(InputError, match="index.M=auto needs index.memory_budget"):
        IndexConfig(M="auto")
    with pytest.raises(InputError, match="not a size"):
        IndexConfig(memory_budget="lots")


def test_dry_run_prints_the_plan_and_writes_nothing(smoke_data, tmp_path, capsys):
    from pipeline.cli import build

    out = tmp_path / "never"
    code = build.main(["--config", "smoke", "--output", str(out),
                       "--set", f"data.corpus={smoke_data}/corpus",
                       "--set", f"data.train_queries={smoke_data}/train_queries",
                       "--set", f"eval.queries={smoke_data}/eval_queries",
                       "--set", f"eval.labels={smoke_data}/labels",
                       "--set", "index.nlist=auto", "--memory-budget", "60kB", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert not os.path.exists(out)
    assert "4,000 vectors, d=32, 4 shards" in printed
    assert "index.nlist: auto -> 64" in printed  # 4 sqrt(4,000) = 253 -> 256, capped at 4,000 / 39
    assert "index.M: auto -> " in printed and "index size" in printed and "teacher" in printed
