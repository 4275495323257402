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
