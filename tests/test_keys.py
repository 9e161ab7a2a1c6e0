"""Stage keys: a changed setting or input file changes exactly the keys of the stages that
read it and of every stage below them."""
import pytest

from pipeline import keys
from pipeline.config import load_config
from pipeline.runner import STAGES

INPUTS = {"corpus": "c1", "train_queries": "t1", "eval_queries": "e1", "labels": "l1"}


def changed(overrides=(), inputs=None) -> list[str]:
    base = keys.stage_keys(load_config(None, ["data.corpus=/x"]), INPUTS)
    new = keys.stage_keys(load_config(None, ["data.corpus=/x", *overrides]), inputs or INPUTS)
    return [s for s in STAGES if base[s][0] != new[s][0]]


def test_stages_are_keyed_in_run_order():
    assert list(keys.FIELDS) == STAGES == list(keys.DEPS)


@pytest.mark.parametrize("override, stages", [
    ("eval.nprobe=[2]", ["evaluate"]),
    ("data.labels=/l", ["evaluate"]),
    ("train.lr=0.2", ["train", "export", "encode", "merge", "evaluate"]),
    ("train.loss=kl", ["train", "export", "encode", "merge", "evaluate"]),
    ("index.M=16", ["init", "train", "export", "encode", "merge", "evaluate"]),
    ("teacher.k=20", ["teacher", "train", "export", "encode", "merge", "evaluate"]),
    ("data.rows_per_shard=7", STAGES),
    # how a stage runs, not what it makes: no stage runs again
    ("train.num_workers=2", []),
    ("build.list_ranges=3", []),
    ("ray.num_cpus=8", []),
    ("publish.keep_versions=5", []),
])
def test_a_setting_reruns_what_reads_it(override, stages):
    assert changed([override]) == stages


def test_input_files_are_part_of_the_keys():
    assert changed(inputs={**INPUTS, "corpus": "c2"}) == STAGES
    assert changed(inputs={**INPUTS, "eval_queries": "e2"}) == ["evaluate"]


def test_why_names_the_changed_fields_and_upstream_stages():
    cfg = load_config(None, ["data.corpus=/x"])
    old = keys.stage_keys(cfg, INPUTS)
    new = keys.stage_keys(load_config(None, ["data.corpus=/x", "train.lr=0.2"]), INPUTS)
    record = {"fields": old["train"][1], "deps": old["train"][2]}
    assert keys.why_rerun(record, new["train"][1], new["train"][2]) == "train.lr"
    record = {"fields": old["export"][1], "deps": old["export"][2]}
    assert keys.why_rerun(record, new["export"][1], new["export"][2]) == "upstream train"
    assert keys.why_rerun(None, new["export"][1], new["export"][2]) == "not run before"


def test_a_record_of_an_older_format_runs_again(monkeypatch):
    """A stage whose record format was bumped reruns, naming why, with everything below it:
    a record an older version wrote is never read by newer stages."""
    cfg = load_config(None, ["data.corpus=/x"])
    now = keys.stage_keys(cfg, INPUTS)
    monkeypatch.setitem(keys.FORMATS, "ingest", keys.FORMATS["ingest"] - 1)
    older = keys.stage_keys(cfg, INPUTS)
    assert [s for s in STAGES if now[s][0] != older[s][0]] == STAGES  # all lie below ingest
    assert keys.why_rerun({"fields": older["ingest"][1], "deps": {}}, now["ingest"][1],
                          {}) == "stage format"
