import pytest

from certdist.config import ConfigError, RunConfig, dump_yaml, from_dict, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: cc-ibp\neps: 0.3\nattack: {steps: 3}\n")
    c = load_config(f, ["attack.steps=5", "lr_milestones=[2, 3]", "distill.beta=0.01"])
    assert c.method == "cc-ibp" and c.eps == 0.3 and c.attack.steps == 5
    assert c.lr_milestones == (2, 3) and c.distill.beta == 0.01
    assert c.attack.step_size == RunConfig().attack.step_size


def test_round_trip_through_yaml(tmp_path):
    c = load_config(None, ["method=sabr", "sabr_lambda=0.3", "data.train_limit=10"])
    f = tmp_path / "r.yaml"
    f.write_text(dump_yaml(c))
    assert load_config(f) == c
    assert from_dict(to_dict(c)) == c


def test_frozen():
    c = RunConfig()
    with pytest.raises(Exception):
        c.eps = 0.2  # type: ignore[misc]


@pytest.mark.parametrize("override,match", [
    ("epsilon=0.1", r"unknown config key 'epsilon'; valid keys: .*eps"),
    ("attack.stepz=1", r"unknown config key 'attack.stepz'; valid keys under attack: .*steps"),
    ("eps=-0.1", r"eps: must be >= 0"),
    ("method=magic", r"unknown method 'magic'; valid: standard, pgd-at, ibp"),
    ("epochs=two", r"epochs: expected an integer"),
    ("alpha=1.5", r"alpha: must lie in \[0, 1\]"),
    ("distill.level=pixels", r"distill.level"),
    ("progress=maybe", r"progress: expected true/false"),
])
def test_bad_values_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/cfg.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["eps"])


def test_teacher_needs_certified_method():
    with pytest.raises(ConfigError, match="distillation needs a certified method"):
        load_config(None, ["method=standard", "distill.teacher=t.pt"])


@pytest.mark.parametrize("override,match", [
    ("eval.batch_size=0", "eval: need batch_size >= 1"),
    ("eval.limit=0", "eval.limit: must be >= 1"),
    ("lr_decay=0", "lr_decay: must be > 0"),
    ("seed=-1", "seed: must be >= 0"),
    ("data.train_limit=0", "data.train_limit: must be >= 1"),
    ("data.dataset=foo", "unknown dataset 'foo'; valid: .*mnist"),
    ("model.arch=foo", "unknown model 'foo'; valid: .*dm_small"),
    ("attack.step_size=0", "attack.step_size: must be > 0"),
    ("data.validation=0", "data.validation: must be >= 1"),
    ("distill.loss=l2", "distill.loss: unknown loss 'l2'; valid: box, point, kl"),
    ("distill.features=z", "distill.features: unknown value 'z'; valid: raw, standardized, normalized"),
    ("distill.features=standardized", "distill.loss: kl distils soft labels: set distill.level=logits"),
    ("distill.temperature=0", "distill.temperature: must be > 0"),
    ("distill.beta_schedule=cosine", "distill.beta_schedule: unknown schedule 'cosine'; valid: constant, decay, late"),
    ("eval.split=val", "eval.split: unknown split 'val'; valid: test, validation"),
    ("eval.split=validation", "eval.split: validation needs a held-out split: set data.validation"),
])
def test_more_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_distill_defaults_are_the_validated_choice():
    """Default: soft-label KL on logits, T 4, beta 0.1 (docs/results.md); the paper's box resolves to features."""
    from certdist.losses import default_beta
    d = load_config(None, []).distill
    assert (d.loss, d.level, d.temperature, d.features, d.beta) == ("kl", "logits", 4.0, "raw", None)
    assert default_beta(10, "kl") == 0.1 and default_beta(100, "box") == 0.05
    assert load_config(None, ["distill.loss=box"]).distill.level == "features"
    assert load_config(None, ["distill.loss=box", "distill.level=logits"]).distill.level == "logits"
    with pytest.raises(ConfigError, match="kl distils soft labels"):
        load_config(None, ["distill.level=features"])


def test_distill_settings_without_a_teacher_do_not_count_as_a_difference():
    from certdist.config import differing_keys, to_dict
    a = to_dict(load_config(None, ["method=cc-ibp"]))
    b = to_dict(load_config(None, ["method=cc-ibp", "distill.loss=box"]))
    assert differing_keys(a, b) == []
    ta = to_dict(load_config(None, ["method=cc-ibp", "distill.teacher=t.pt"]))
    tb = to_dict(load_config(None, ["method=cc-ibp", "distill.teacher=t.pt", "distill.loss=box"]))
    assert differing_keys(ta, tb) == ["distill"] and differing_keys(a, ta) == ["distill"]


def test_methods_come_from_one_registry_that_validation_help_and_the_objective_read():
    from certdist import config
    from certdist.training import objective
    assert config.METHODS == tuple(config.METHOD_REGISTRY) and set(config.METHOD_HELP) == set(config.METHODS)
    assert objective.CERTIFIED_METHODS == tuple(n for n, m in config.METHOD_REGISTRY.items() if m.certified)
    assert set(objective.CERTIFIED_METHODS) <= set(objective.CERTIFIED_LOSSES)  # every certified method has a loss
    assert config.get_method("pgd-at").attack and not config.get_method("pgd-at").certified
    assert config.get_method("cc-ibp").alpha and not config.get_method("ibp").alpha
    with pytest.raises(ConfigError, match="unknown method 'magic'; valid: standard, pgd-at"):
        config.get_method("magic")
    with pytest.raises(ValueError, match="already registered"):
        config.register_method(config.Method("ibp", "again"))
    help_text = config.config_help()
    assert "pgd-at" in help_text and "attack.steps=10 attack.step_size=0.25" in help_text


def test_a_method_brings_its_recipe_and_explicit_values_win(tmp_path):
    """PGD-AT without attack settings is the 10-step PGD-AT of configs/small/*_pgd-at-teacher.yaml, not the
    certified methods' one-step attack of 10 x eps behind a warm-up and an eps ramp."""
    pgd = load_config(None, ["method=pgd-at"])
    assert (pgd.attack.steps, pgd.attack.step_size, pgd.warmup_epochs, pgd.ramp_epochs) == (10, 0.25, 0, 0)
    assert pgd.model.init == "default"
    mine = load_config(None, ["method=pgd-at", "attack.steps=3", "ramp_epochs=2"])
    assert (mine.attack.steps, mine.attack.step_size, mine.ramp_epochs) == (3, 0.25, 2)  # key by key
    f = tmp_path / "c.yaml"
    f.write_text("method: pgd-at\nattack: {steps: 1, step_size: 10.0}\n")
    assert (load_config(f).attack.steps, load_config(f).attack.step_size) == (1, 10.0)  # the YAML's, not the recipe's
    cc = load_config(None, ["method=cc-ibp"])
    assert (cc.attack.steps, cc.attack.step_size, cc.warmup_epochs, cc.ramp_epochs) == (1, 10.0, 1, 5)
    assert cc.model.init == "ibp" and from_dict({"method": "pgd-at"}).attack.steps == 10


def test_the_shipped_configs_set_everything_the_recipes_would_change():
    """configs/small and configs/paper resolve exactly as their YAML reads over the dataclass defaults:
    the method recipes change none of them."""
    import yaml

    from certdist.config import RunConfig, _from_dict, packaged_configs_dir
    files = sorted(packaged_configs_dir().glob("*/*.yaml"))
    assert len(files) >= 40
    for f in files:
        assert load_config(f) == _from_dict(RunConfig, yaml.safe_load(f.read_text())), f.name


def test_the_schedule_scales_with_epochs_unless_it_is_set():
    c = load_config(None, ["method=cc-ibp", "eps=0.2", "epochs=3"])
    assert (c.warmup_epochs, c.ramp_epochs, c.lr_milestones) == (0, 2, (2,))
    c = load_config(None, ["method=cc-ibp", "epochs=2"])
    assert (c.warmup_epochs, c.ramp_epochs, c.lr_milestones) == (0, 1, ())
    c = load_config(None, ["method=cc-ibp", "epochs=20"])
    assert (c.warmup_epochs, c.ramp_epochs, c.lr_milestones) == (2, 10, (16, 18))
    c = load_config(None, ["method=cc-ibp", "epochs=4", "ramp_epochs=3"])  # the explicit ramp is kept
    assert (c.warmup_epochs, c.ramp_epochs, c.lr_milestones) == (0, 3, (3,))
    assert load_config(None, ["method=cc-ibp"]) == load_config(None, ["method=cc-ibp", "epochs=10"])


@pytest.mark.parametrize("config,overrides,match", [
    # a packaged config ramps eps over epochs 2-6: with epochs=3 it would stop at 0.046 of train eps 0.2
    ("small/mnist_cc-ibp.yaml", ["epochs=3"], r"warmup_epochs \+ ramp_epochs: .*1 \+ 5 = 6, past the last epoch "
                                              r"\(epochs=3\).*fraction of eps 0.2"),
    (None, ["method=cc-ibp", "epochs=3", "ramp_epochs=5"], r"warmup_epochs \+ ramp_epochs"),
    (None, ["method=ibp", "epochs=2", "warmup_epochs=2", "ramp_epochs=0"], r"warmup_epochs: 2 >= epochs \(2\)"),
    (None, ["method=cc-ibp", "epochs=3", "lr_milestones=[2, 3]"], r"lr_milestones: 3 >= epochs \(3\) would never"),
    ("small/mnist_pgd-at-teacher.yaml", ["epochs=5"], r"lr_milestones: 8, 9 >= epochs \(5\)"),
    (None, ["lr_milestones=[-1]"], r"lr_milestones: must be >= 0"),
])
def test_a_set_schedule_that_does_not_fit_in_epochs_is_refused(config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(config, overrides)


def test_standard_training_has_no_eps_ramp_to_fit():
    c = load_config(None, ["method=standard", "epochs=1", "warmup_epochs=3", "ramp_epochs=3", "lr_milestones=[]"])
    assert c.epochs == 1
