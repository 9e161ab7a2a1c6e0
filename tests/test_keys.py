"""Stage keys: a changed setting or input file changes exactly the keys of the stages that
read it and of every stage below them. A stage's key covers the config sections it declares,
and a stage cannot read any other."""
import dataclasses

import pytest

from pipeline import keys
from pipeline.config import PipelineConfig, load_config
from pipeline.runner import GRAPH, STAGES
from pipeline.stages import teacher
from pipeline.workflow.results import Ingested
from pipeline.workflow.stage import UNKEYED, Context, Run, StageConfig, UndeclaredSection

INPUTS = {"data.corpus": "c1", "data.train_queries": "t1", "eval.queries": "e1",
          "eval.labels": "l1"}


def changed(overrides=(), inputs=None, base=("data.corpus=/x",)) -> list[str]:
    old = keys.stage_keys(load_config(None, list(base)), GRAPH, INPUTS)
    new = keys.stage_keys(load_config(None, [*base, *overrides]), GRAPH, inputs or INPUTS)
    return [s for s in STAGES if old[s][0] != new[s][0]]


def test_the_graph_lists_each_stage_after_the_stages_it_needs():
    seen = set()
    for stage in GRAPH:
        assert set(stage.needs) <= seen, f"{stage.name} needs {stage.needs}"
        seen.add(stage.name)


def test_every_section_is_keyed_by_a_stage_or_changes_no_result():
    """A section that no stage declares and that is not `ray` or `publish` would change
    results without rerunning anything."""
    declared = {s for stage in GRAPH for s in stage.sections}
    assert declared.isdisjoint(UNKEYED)
    sections = {f.name for f in dataclasses.fields(PipelineConfig)}
    assert sections - declared == {"ray", "publish"}


@pytest.mark.parametrize("override, stages", [
    ("eval.nprobe=[2]", ["evaluate"]),
    ("eval.labels=/l", ["evaluate"]),
    ("train.lr=0.2", ["train", "export", "encode", "merge", "evaluate"]),
    ("loss.kind=kl", ["train", "export", "encode", "merge", "evaluate"]),
    ("negatives.per_list=0", ["train", "export", "encode", "merge", "evaluate"]),
    ("train.seed=3", ["train", "export", "encode", "merge", "evaluate"]),
    ("index.M=16", ["init", "train", "export", "encode", "merge", "evaluate"]),
    ("init.niter=3", ["init", "train", "export", "encode", "merge", "evaluate"]),
    ("teacher.k=20", ["teacher", "train", "export", "encode", "merge", "evaluate"]),
    ("teacher.seed=1", ["teacher", "train", "export", "encode", "merge", "evaluate"]),
    ("build.baseline=off", ["encode", "merge", "evaluate"]),
    ("build.output_parts=3", ["encode", "merge", "evaluate"]),
    ("data.rows_per_shard=7", STAGES),
    ("data.train_sample=5000", STAGES),
    # how a stage runs, not what it makes: no stage runs again
    ("ray.train_workers=2", []),
    ("ray.num_cpus=8", []),
    ("publish.keep_versions=5", []),
])
def test_a_setting_reruns_what_reads_it(override, stages):
    assert changed([override]) == stages


def test_the_build_section_reruns_encode_and_below():
    """encode reads build.baseline (which indexes it encodes), so build.fastscan, in the same
    section, reruns it too."""
    four_bit = ("data.corpus=/x", "index.nbits=4", "index.M=16")
    assert changed(["build.fastscan=true"], base=four_bit) == ["encode", "merge", "evaluate"]


def test_input_files_are_part_of_the_keys():
    assert changed(inputs={**INPUTS, "data.corpus": "c2"}) == STAGES
    assert changed(inputs={**INPUTS, "eval.queries": "e2"}) == ["evaluate"]


def test_why_names_the_changed_fields_and_upstream_stages():
    cfg = load_config(None, ["data.corpus=/x"])
    old = keys.stage_keys(cfg, GRAPH, INPUTS)
    new = keys.stage_keys(load_config(None, ["data.corpus=/x", "train.lr=0.2"]), GRAPH, INPUTS)
    record = {"fields": old["train"][1], "deps": old["train"][2]}
    assert keys.why_rerun(record, new["train"][1], new["train"][2]) == "train.lr"
    record = {"fields": old["export"][1], "deps": old["export"][2]}
    assert keys.why_rerun(record, new["export"][1], new["export"][2]) == "upstream train"
    assert keys.why_rerun(None, new["export"][1], new["export"][2]) == "not run before"


def test_a_record_of_an_older_format_runs_again():
    """A stage whose record format was bumped reruns, naming why, with everything below it:
    a record an older version wrote is never read by newer stages."""
    cfg = load_config(None, ["data.corpus=/x"])
    now = keys.stage_keys(cfg, GRAPH, INPUTS)
    older_graph = [dataclasses.replace(s, format=s.format - 1) if s.name == "ingest" else s
                   for s in GRAPH]
    older = keys.stage_keys(cfg, older_graph, INPUTS)
    assert [s for s in STAGES if now[s][0] != older[s][0]] == STAGES  # all lie below ingest
    assert keys.why_rerun({"fields": older["ingest"][1], "deps": {}}, now["ingest"][1],
                          {}) == "stage format"


def test_a_stage_cannot_read_a_section_it_does_not_declare(tmp_path):
    """The real teacher stage, declared without the `data` section it reads (data.metric):
    it fails on that read, before any work, naming the section and what to change. So a
    setting that a stage reads is always one that its key covers."""
    cfg = load_config(None, ["data.corpus=/x"])
    view = StageConfig.of("teacher", cfg, ("teacher",))
    assert view.teacher == cfg.teacher and view.ray == cfg.ray  # declared, and `ray`
    with pytest.raises(UndeclaredSection, match="'index'"):
        view.index  # noqa: B018
    ingested = Ingested(n=10, d=4, shards=[], train_query_files=[], inputs={}, sample=10,
                        train_queries=0)
    ctx = Context("teacher", view, {"ingest": ingested}, Run(str(tmp_path)))
    with pytest.raises(UndeclaredSection, match="reads config section 'data'.*add 'data'"):
        teacher.run(ctx)
    assert not (tmp_path / "stages").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.teacher = cfg.teacher
