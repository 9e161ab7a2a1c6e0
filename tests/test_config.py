import pytest

from pipeline.config import PipelineConfig, load_config, validate_for_pipeline


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  corpus: /x\nindex:\n  M: 16\n")
    cfg = load_config(str(p), ["index.nlist=64", "eval.nprobe=[1, 2]", "ray.train_gpu=true",
                               "train.lr=1e-4"])  # YAML 1.1 reads 1e-4 as a string
    assert (cfg.index.M, cfg.index.nlist, cfg.eval.nprobe, cfg.ray.train_gpu, cfg.train.lr) == \
        (16, 64, (1, 2), True, 1e-4)
    assert cfg.hash() != PipelineConfig().hash()


@pytest.mark.parametrize("old, new", [("train.num_workers=2", "ray.train_workers"),
                                      ("train.loss=kl", "loss.kind"),
                                      ("data.eval_queries=/q", "eval.queries"),
                                      ("index.metric=l2", "data.metric")])
def test_a_moved_key_names_where_it_lives_now(old, new):
    with pytest.raises(ValueError, match=f"{old.split('=')[0]} is now {new}"):
        load_config(None, ["data.corpus=/x", old])


def test_an_unquoted_off_is_the_mode_off(tmp_path):
    """YAML 1.1 reads `off` as false: a mode named off still takes it."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  corpus: /x\nbuild:\n  baseline: off\n")
    assert load_config(str(p)).build.baseline == "off"


def test_with_values_changes_fields_and_checks_them_again():
    cfg = load_config(None, ["data.corpus=/x"])
    new = cfg.with_values({"loss.kind": "kl", "negatives.per_list": 0, "train.lr": 0.1})
    assert (new.loss.kind, new.negatives.per_list, new.train.lr) == ("kl", 0, 0.1)
    assert new.index == cfg.index
    with pytest.raises(ValueError, match="negatives.corpus"):
        cfg.with_values({"negatives.corpus": -1})


@pytest.mark.parametrize("override, message", [
    ("index.bogus=1", "unknown config key"),
    ("nosection.key=1", "unknown config key"),
    ("index.M=eight", "expected an integer"),
    ("train.lr=fast", "expected a number"),
    ("negatives.in_batch=3", "expected true or false"),
    ("data.metric=cosine", "data.metric"),
    ("train.batch_size=255", "divisible"),
    ("loss.kind=listmle", "loss.kind"),
    ("negatives.sampler=hard", "negatives.sampler"),
    ("index.quantizer=rq", "index.opq=false"),
    ("index.quantizer=lsq", "index.quantizer=lsq takes no OPQ rotation"),
    ("loss.balance_weight=-1", "_weight"),
    ("negatives.per_list=-1", "per_list"),
    ("train.lr_backoff=0", "lr_backoff"),
    ("train.val_checks=0", "val_checks"),
    ("train.backoff_z=-1", "backoff_z"),
    ("train.lr=0", "train.lr"),
    ("train.rotation_lr=-1e-4", "rotation_lr"),
    ("ray.max_failures=-1", "max_failures"),
    ("build.output_parts=-1", "output_parts"),
    ("teacher.val_fraction=1", "teacher.val_fraction"),
    ("teacher.band_depth=0", "band_size=20 drawn from ranks 11..0"),
    ("teacher.band_depth=25", "needs 0 < band_size < band_depth - teacher.k"),
    ("teacher.band_size=290", "set both to 0 for no band"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.corpus=/x", "ray.train_workers=2", override])


def test_lsq_needs_four_codes():
    with pytest.raises(ValueError, match="index.M >= 4"):
        load_config(None, ["data.corpus=/x", "index.quantizer=lsq", "index.opq=false",
                           "index.M=2"])


@pytest.mark.parametrize("overrides", [["train.streams=3"], ["train.batch_size=36"],
                                       ["ray.train_workers=16"]])
def test_training_streams_must_split_evenly(overrides):
    """The pipeline's workers read whole streams: streams is a multiple of the worker count
    and divides the batch (the benchmark, training in memory, has no streams)."""
    cfg = load_config(None, ["data.corpus=/x", "train.batch_size=64", *overrides])
    with pytest.raises(ValueError, match="train.streams"):
        validate_for_pipeline(cfg)
    validate_for_pipeline(load_config(None, ["data.corpus=/x", "train.batch_size=64"]))


def test_corpus_required():
    with pytest.raises(ValueError, match="data.corpus"):
        load_config(None, [])


def test_presets_load():
    for name in ("smoke", "demo", "example"):
        load_config(name)
