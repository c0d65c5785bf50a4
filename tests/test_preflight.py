"""The preflight of `make reproduce SCALE=paper`: every paper study and method, on CPU.

The data sets are replaced by random images of the real shapes (no MNIST, CIFAR or ImageNet
here); everything else (configs, models, methods, trainers, the Hessian protocol) is the paper
scale's. The default suite builds every (study, method) and traces one chunk of each supervised
study; the slow suite compiles and runs one tiny chunk of every method of every study.
"""

import numpy as np
import pytest

from spectral_plasticity import preflight, reproduce, tasks
from spectral_plasticity.tasks.idx import ImageDataset


def _images(shape, classes, train_per_class, test_per_class):
    rng = np.random.default_rng(0)
    train = np.repeat(np.arange(classes), train_per_class).astype(np.uint8)
    test = np.repeat(np.arange(classes), test_per_class).astype(np.uint8)
    return ImageDataset(rng.integers(0, 256, (len(train), *shape), dtype=np.uint8), train,
                        rng.integers(0, 256, (len(test), *shape), dtype=np.uint8), test)


@pytest.fixture
def fake_data(monkeypatch):
    """MNIST, CIFAR-100 (the 10 classes a tiny run reads) and continual ImageNet, random."""
    monkeypatch.setattr(tasks, "load_idx_dataset",
                        lambda name, data_dir=None, **_: _images((28, 28), 10, 4, 4))
    monkeypatch.setattr(tasks, "load_cifar100",
                        lambda data_dir=None, **_: _images((32, 32, 3), 10, 500, 4))
    monkeypatch.setattr(tasks, "load_continual_imagenet", lambda data_dir=None, num_classes=None:
                        np.random.default_rng(0).integers(0, 256, (num_classes, 700, 32, 32, 3),
                                                          dtype=np.uint8))


def _plan(studies=reproduce.PAPER_STUDIES):
    return [(s.experiment, reproduce.study_config(s, "paper"), s.methods) for s in studies]


def test_tiny_config_shortens_the_run_and_keeps_the_protocol():
    study = reproduce.PAPER_STUDIES[1]
    config = reproduce.study_config(study, "paper")
    tiny = preflight.tiny_config(config)
    assert (tiny.stream.num_tasks, tiny.tasks_per_chunk, tiny.seeds) == (2, 2, 1)
    assert tiny.hessian.num_iters == preflight.LANCZOS_STEPS
    for same in ("model", "optimizer", "method_settings", "method_settings_by_method",
                 "batch_size", "methods"):
        assert tiny[same] == config[same], same
    ppo = preflight.tiny_config(reproduce.study_config(reproduce.PAPER_STUDIES[3], "paper"))
    assert ppo.num_phases == 1
    assert ppo.steps_per_phase == ppo.ppo.num_envs * ppo.ppo.num_steps


def test_every_paper_study_builds_every_method(fake_data):
    """Every supervised study with all its methods; Slippery Ant with its first (building the
    Brax ant takes seconds per method: the slow test builds and runs them all)."""
    plan = [(name, config, methods if config.trainer != "ppo" else methods[:1])
            for name, config, methods in _plan()]
    checked = preflight.check_plan(plan, mode="build")
    assert [(c.study, c.method) for c in checked] == [
        (name, m) for name, _, methods in plan for m in methods]
    assert all(c.error is None for c in checked)


@pytest.mark.parametrize("study", reproduce.PAPER_STUDIES[:3], ids=lambda s: s.experiment)
def test_one_method_of_each_supervised_study_traces_its_chunk(fake_data, study):
    """The whole chunk traced (shapes of the paper's ConvNet, ResNet head, Hessian protocol),
    without the compilation the slow test pays for."""
    (checked,) = preflight.check_plan([(study.experiment, reproduce.study_config(study, "paper"),
                                        ("l2_er",))], mode="trace", shrink_model=True)
    assert checked.error is None


@pytest.mark.slow
def test_one_method_runs_one_tiny_chunk(fake_data):
    study = reproduce.PAPER_STUDIES[1]  # continual ImageNet: the paper's ConvNet
    (checked,) = preflight.check_plan([(study.experiment, reproduce.study_config(study, "paper"),
                                        ("bp",))], shrink_model=True)
    assert checked.error is None and checked.seconds > 0


def test_a_method_the_model_cannot_run_fails_with_one_line_naming_study_and_method(fake_data):
    study = reproduce.PAPER_STUDIES[2]
    config = reproduce.study_config(study, "paper")
    config.model.head_hidden_sizes = ()  # Dohare et al.'s linear head: no units to recycle
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check_plan([("incremental_cifar", config, ("bp", "cbp"))], mode="build")
    (line,) = str(error.value).splitlines()
    assert line.startswith("preflight: incremental_cifar / cbp: ValueError: unit recycling "
                           "supports MLP, ConvNet and a ResNet18 with fully connected head"), line


def test_unknown_methods_and_stray_settings_fail_as_config_lines(fake_data):
    config = reproduce.study_config(reproduce.PAPER_STUDIES[0], "paper")
    with pytest.raises(preflight.PreflightError, match=r"^preflight: permuted_mnist / \(config\)"
                       r": ValueError: unknown methods \['sgd'\]"):
        preflight.check_plan([("permuted_mnist", config, ("bp", "sgd"))], mode="build")


@pytest.mark.slow
@pytest.mark.parametrize("study", reproduce.PAPER_STUDIES, ids=lambda s: s.experiment)
def test_every_method_of_every_paper_study_runs_one_tiny_chunk(fake_data, study):
    checked = preflight.check_plan(_plan([study]), shrink_model=True)
    assert [c.method for c in checked] == list(study.methods)
