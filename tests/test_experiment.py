"""Experiment configs: loading by name, overrides from the command line, clear errors."""

import json
import textwrap

import ml_collections
import pytest

from spectral_plasticity import experiment
from spectral_plasticity.train import ConfigChangedError


@pytest.fixture
def experiments_dir(tmp_path):
    (tmp_path / "toy.py").write_text(textwrap.dedent("""
        import ml_collections

        def get_config(scale):
            config = ml_collections.ConfigDict()
            config.trainer = "supervised"
            config.methods = ("bp", "l2")
            config.seeds = 2 if scale == "small" else 30
            config.sweep = ml_collections.ConfigDict()
            config.optimizer = ml_collections.ConfigDict({"learning_rate": 0.01, "name": "sgd"})
            return config
    """))
    (tmp_path / "_helpers.py").write_text("")
    return tmp_path


def test_load_config_by_name_and_scale(experiments_dir):
    assert experiment.available_experiments(experiments_dir) == ["toy"]
    small = experiment.load_config("toy", "small", experiments_dir)
    paper = experiment.load_config("toy", "paper", experiments_dir)
    assert (small.seeds, paper.seeds) == (2, 30)
    assert small.experiment == "toy" and paper.scale == "paper"


def test_unknown_experiment_and_scale_list_the_choices(experiments_dir):
    with pytest.raises(ValueError, match=r"unknown experiment 'nope'; choose one of \['toy'\]"):
        experiment.load_config("nope", "small", experiments_dir)
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        experiment.load_config("toy", "huge", experiments_dir)


def test_overrides_set_typed_values(experiments_dir):
    config = experiment.load_config("toy", "small", experiments_dir)
    experiment.apply_override(config, "optimizer.learning_rate=3e-4")
    experiment.apply_override(config, "optimizer.learning_rate=1")
    experiment.apply_override(config, "seeds=5")
    experiment.apply_override(config, "methods=bp,l2_er")
    experiment.apply_override(config, "optimizer.name=adam")
    assert config.optimizer.learning_rate == 1.0
    assert isinstance(config.optimizer.learning_rate, float)
    assert config.seeds == 5
    assert config.methods == ("bp", "l2_er")
    assert config.optimizer.name == "adam"


@pytest.mark.parametrize(
    ("assignment", "match"),
    [
        ("optimizer.lr=0.1", r"unknown config key 'optimizer.lr'; valid keys of optimizer: "
                             r"\['learning_rate', 'name'\]"),
        ("model.width=3", "has no section 'model'"),
        ("seeds=many", "bad value for seeds"),
        ("seeds", "must look like key=value"),
    ],
)
def test_bad_overrides_are_refused(experiments_dir, assignment, match):
    config = experiment.load_config("toy", "small", experiments_dir)
    with pytest.raises(ValueError, match=match):
        experiment.apply_override(config, assignment)
    assert isinstance(config, ml_collections.ConfigDict)


def test_unknown_trainer_is_refused(experiments_dir):
    config = experiment.load_config("toy", "small", experiments_dir)
    config.trainer = "evolution"
    with pytest.raises(ValueError, match="unknown trainer 'evolution'"):
        experiment.make_trainer(config)


@pytest.mark.parametrize("scale", experiment.SCALES)
def test_every_shipped_experiment_config_loads_and_names_known_methods(scale):
    from spectral_plasticity.train import method_registry

    names = experiment.available_experiments()
    assert {"permuted_mnist", "permuted_fashion_mnist", "slowly_changing_regression",
            "continual_imagenet", "incremental_cifar"} <= set(names)
    for name in names:
        config = experiment.load_config(name, scale)
        assert config.trainer in experiment.TRAINERS, name
        method_registry.check_methods(list(config.methods))
        assert config.seeds >= 1


def test_per_method_settings_for_a_method_not_run_are_refused_before_anything_runs(tmp_path):
    config = experiment.load_config("permuted_fashion_mnist", "small")
    config.methods = ("bp", "l2")
    config.method_settings_by_method = ml_collections.ConfigDict({"l2_er": {"l2": 1e-3}})
    with pytest.raises(ValueError, match=r"names methods \['l2_er'\] that this experiment"):
        experiment.train_and_evaluate(config, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_entry_can_be_added_by_override(experiments_dir):
    config = experiment.load_config("toy", "small", experiments_dir)
    experiment.apply_override(config, "sweep.learning_rate=[0.01,0.03]")
    assert list(config.sweep.learning_rate) == [0.01, 0.03]
    for bad in ("sweep.learning_rate=0.01", "sweep.learning_rate=[]",
                "sweep.learning_rate=[a,b]"):
        with pytest.raises(ValueError, match="a sweep entry is a list of numbers"):
            experiment.apply_override(config, bad)


def test_a_tuple_of_integers_refuses_other_values_naming_the_key(experiments_dir):
    config = experiment.load_config("toy", "small", experiments_dir)
    config.hidden_sizes = (100, 100)
    experiment.apply_override(config, "hidden_sizes=5,7")
    assert config.hidden_sizes == (5, 7)
    with pytest.raises(ValueError, match=r"bad value for hidden_sizes: 'abc'; expected integers"):
        experiment.apply_override(config, "hidden_sizes=abc")


def test_run_dir_names_the_experiment_and_scale(tmp_path):
    assert experiment.run_dir(tmp_path, "toy", "paper") == tmp_path / "toy-paper"


def _regression_config():
    config = experiment.load_config("slowly_changing_regression", "small")
    config.update(seeds=1, tasks_per_chunk=1, methods=("bp", "l2"))
    config.stream.update(num_tasks=1, flip_after=5, eval_size=16)
    config.hessian.update(num_iters=4, grid_size=20, examples=16)
    return config


@pytest.mark.parametrize(("field", "value", "match"), [
    ("seeds", -1, r"seeds must be a positive number of seeds, got -1"),
    ("optimizer.name", "foo", r"config.optimizer of method 'bp': unknown optimizer 'foo'"),
])
def test_bad_values_are_refused_before_any_directory_is_created(tmp_path, field, value, match):
    config = _regression_config()
    experiment.apply_override(config, f"{field}={value}")
    with pytest.raises(ValueError, match=match):
        experiment.train_and_evaluate(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_every_method_is_checked_against_its_saved_config_before_any_runs(tmp_path):
    config = _regression_config()
    experiment.train_and_evaluate(config, tmp_path, methods=["l2"])
    summary = json.loads((tmp_path / "l2" / "summary.json").read_text())
    assert summary["data"] == {"stream": "slowly_changing_regression", "source": "generated"}
    assert summary["swept"] == []
    config.hessian.examples = 8
    with pytest.raises(ConfigChangedError, match=r"hessian.examples: 16 -> 8"):
        experiment.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "bp").exists()
