"""Every configuration outside the layer-support contract (:mod:`certdist.models.support`) is refused up
front with a clear error naming the module, its type and the option: by ``certify_dataset`` before any
record is written, by the bound functions, ``evaluate``, ``export_onnx`` and ``fit`` (before a run
folder is made). Hooks, pruning, parametrizations and weight/spectral norm would make ``model(x)`` (what
attacks and counterexample checks run) differ from the function the bound rules read."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from certdist.evaluation import evaluate
from certdist.models import CertifiableNet, Normalize
from certdist.models.support import UnsupportedNetworkError, check_supported
from certdist.propagation import alpha_crown, crown, crown_ibp, ibp
from certdist.threats import ThreatModel
from certdist.interop import export_onnx
from certdist.verification import CertifyConfig, certify_dataset, certify_point
from certdist.training.fit import fit

SHAPE = (1, 4, 4)


def _base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 6), nn.ReLU(),
                         nn.Linear(6, 3)).eval()


def _with(i: int, layer: nn.Module, head_in: int | None = None) -> nn.Sequential:
    """The base net with layer ``i`` replaced (and the head resized to ``head_in`` inputs)."""
    layers = list(_base())
    layers[i] = layer
    if head_in is not None:
        layers[3] = nn.Linear(head_in, 6)
    return nn.Sequential(*layers).eval()


def _hooked(kind: str) -> nn.Sequential:
    net = _base()
    if kind == "forward":
        net[1].register_forward_hook(lambda m, i, o: o * 2)
    elif kind == "forward-pre":
        net[3].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    elif kind == "backward":
        net[3].register_full_backward_hook(lambda m, gi, go: None)
    elif kind == "container":
        net.register_forward_hook(lambda m, i, o: -o)
    return net


def _pruned() -> nn.Sequential:
    net = _base()
    prune.l1_unstructured(net[3], "weight", amount=0.5)
    return net


def _parametrized(kind: str) -> nn.Sequential:
    net = _base()
    if kind == "weight_norm":
        parametrizations.weight_norm(net[3])
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(net[0])
    else:
        class Double(nn.Module):
            def forward(self, w):
                return 2 * w
        parametrize.register_parametrization(net[5], "weight", Double())
    return net.eval()


def _old_norm(kind: str) -> nn.Sequential:
    net = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "weight_norm":
            torch.nn.utils.weight_norm(net[3])
        else:
            torch.nn.utils.spectral_norm(net[3])
    return net.eval()


def _instance_forward() -> nn.Sequential:
    net = _base()
    net[1].forward = lambda x: torch.relu(x) + 1
    return net


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _base()

    def layers(self):
        return list(self.body)

    def forward(self, x):
        return self.body(x) + 1


def _nested_features() -> CertifiableNet:
    b = _base()
    return CertifiableNet(nn.Sequential(nn.Sequential(b[0], b[1]), b[2], b[3], b[4]), b[5], "t", None).eval()


# (id, network factory, regex the error must match: the module path, type and option)
REFUSED = [
    ("forward-hook", lambda: _hooked("forward"), r"module '1' \(ReLU\) has forward hooks"),
    ("forward-pre-hook", lambda: _hooked("forward-pre"), r"module '3' \(Linear\) has forward pre hooks"),
    ("backward-hook", lambda: _hooked("backward"), r"module '3' \(Linear\) has .*backward hooks"),
    ("container-hook", lambda: _hooked("container"), r"module '<model>' \(Sequential\) has forward hooks"),
    ("pruned", _pruned, r"module '3' \(Linear\) is pruned by torch.nn.utils.prune"),
    ("parametrizations.weight_norm", lambda: _parametrized("weight_norm"),
     r"module '3' \(ParametrizedLinear\) has parametrizations on weight"),
    ("parametrizations.spectral_norm", lambda: _parametrized("spectral_norm"),
     r"module '0' \(ParametrizedConv2d\) has parametrizations on weight"),
    ("parametrize", lambda: _parametrized("custom"), r"module '5' \(ParametrizedLinear\) has parametrizations"),
    ("old-weight_norm", lambda: _old_norm("weight_norm"), r"module '3' \(Linear\) is wrapped in torch.nn.utils.weight_norm"),
    ("old-spectral_norm", lambda: _old_norm("spectral_norm"),
     r"module '3' \(Linear\) is wrapped in torch.nn.utils.spectral_norm"),
    ("instance-forward", _instance_forward, r"module '1' \(ReLU\) has a forward method set on the instance"),
    ("avgpool-ceil_mode", lambda: _with(1, nn.AvgPool2d(3, stride=2, ceil_mode=True), 8),
     r"module '1' \(AvgPool2d\): ceil_mode=True is not supported"),
    ("avgpool-divisor_override", lambda: _with(1, nn.AvgPool2d(2, divisor_override=3), 8),
     r"module '1' \(AvgPool2d\): divisor_override=3 is not supported"),
    ("avgpool-count_include_pad", lambda: _with(1, nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)),
     r"module '1' \(AvgPool2d\): count_include_pad=False with padding=1 is not supported"),
    ("conv-same", lambda: _with(0, nn.Conv2d(1, 2, 3, padding="same")),
     r"module '0' \(Conv2d\): padding='same' is not supported .*padding=\(1, 1\)"),
    ("conv-valid", lambda: _with(0, nn.Conv2d(1, 2, 3, padding="valid"), 8),
     r"module '0' \(Conv2d\): padding='valid' is not supported .*padding=0"),
    ("conv-reflect", lambda: _with(0, nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
     r"module '0' \(Conv2d\): padding_mode='reflect' is not supported"),
    ("conv-groups", lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, groups=2),
                                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval(),
     r"module '1' \(Conv2d\): groups=2 is not supported"),
    ("flatten-start_dim", lambda: _with(2, nn.Flatten(start_dim=2), 16),
     r"module '2' \(Flatten\): start_dim=2, end_dim=-1 is not supported"),
    ("identity", lambda: _with(1, nn.Identity()), r"module '1' \(Identity\): layer type Identity is not supported"),
    ("dropout", lambda: _with(1, nn.Dropout(0.1)), r"module '1' \(Dropout\): layer type Dropout is not supported"),
    ("tanh", lambda: _with(1, nn.Tanh()), r"module '1' \(Tanh\): layer type Tanh is not supported"),
    ("linear-subclass", lambda: _with(5, MyLinear(6, 3)), r"module '5' \(MyLinear\): a subclass of Linear"),
    ("custom-container", Chain, r"\(Chain\): expected a CertifiableNet or an nn.Sequential"),
    ("nested-in-features", _nested_features, r"module 'features.0' \(Sequential\): a nested nn.Sequential"),
    ("normalize-channels", lambda: nn.Sequential(Normalize((0.5, 0.5), (0.2, 0.2)), *_base()).eval(),
     r"module '0' \(Normalize\): input with 1 channels, the layer has len\(mean\)=2"),
    ("head-not-flat", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 3)).eval(),
     r"module '2' \(Linear\): the classification head needs a flat input"),
    ("relu-inplace-on-input", lambda: nn.Sequential(nn.Flatten(), nn.ReLU(inplace=True), nn.Linear(16, 3)).eval(),
     r"module '1' \(ReLU\): inplace=True before any computing layer"),
]
IDS = [r[0] for r in REFUSED]


def _data(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPE, generator=g), torch.tensor([0, 1][:n])


@pytest.mark.parametrize("name,make,match", REFUSED, ids=IDS)
def test_certify_dataset_refuses_before_writing_a_record(tmp_path, name, make, match):
    images, labels = _data()
    out = tmp_path / "records.jsonl"
    with pytest.raises(UnsupportedNetworkError, match=match) as info:
        certify_dataset(make(), images, labels, ThreatModel(0.05), out, timeout=5, progress=False)
    assert isinstance(info.value, ValueError)
    assert not out.exists() or out.read_text() == "", "a record was written before the refusal"
    with pytest.raises(UnsupportedNetworkError, match=match):
        certify_point(make(), images[:1], 0, ThreatModel(0.05), CertifyConfig(timeout=5))


@pytest.mark.parametrize("name,make,match", REFUSED, ids=IDS)
def test_bound_functions_evaluate_and_export_refuse(tmp_path, name, make, match):
    x, y = _data()
    threat = ThreatModel(0.05)
    net = make()
    for what, call in [("ibp", lambda: ibp(net, x, threat)), ("crown", lambda: crown(net, x, threat)),
                       ("crown_ibp", lambda: crown_ibp(net, x, threat)),
                       ("alpha_crown", lambda: alpha_crown(net, x, threat, iterations=1)),
                       ("evaluate", lambda: evaluate(net, x, y, threat, pgd_steps=1, progress=False)),
                       ("export_onnx", lambda: export_onnx(net, tmp_path / "n.onnx", SHAPE))]:
        with pytest.raises(UnsupportedNetworkError, match=match):
            call()
    assert not (tmp_path / "n.onnx").exists()


def test_global_module_hooks_are_refused():
    x, _ = _data()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        for call in (lambda: ibp(_base(), x, ThreatModel(0.05)), lambda: check_supported(_base(), SHAPE)):
            with pytest.raises(UnsupportedNetworkError, match="global module forward hooks"):
                call()
    finally:
        handle.remove()
    check_supported(_base(), SHAPE)  # fine again once removed


def test_fit_refuses_student_and_teacher_before_a_run_folder(tmp_path):
    x, y = _data(4)
    loader = [(x, y)]
    with pytest.raises(UnsupportedNetworkError, match="is pruned"):
        fit(_pruned(), loader, epochs=1, out_dir=str(tmp_path), name="run")
    with pytest.raises(UnsupportedNetworkError, match="has forward hooks"):
        fit(_base(), loader, epochs=1, teacher=_hooked("forward"), out_dir=str(tmp_path), name="run")
    assert not (tmp_path / "run").exists()


def test_made_permanent_the_same_networks_are_accepted():
    """The advice in the messages works: prune.remove / remove_parametrizations / remove_weight_norm give
    plain modules with the same function, which the contract accepts and IBP bounds soundly."""
    x, _ = _data(1)
    threat = ThreatModel(0.05)
    for net, undo in [(_pruned(), lambda n: prune.remove(n[3], "weight")),
                      (_parametrized("weight_norm"),
                       lambda n: parametrize.remove_parametrizations(n[3], "weight", leave_parametrized=True)),
                      (_old_norm("weight_norm"), lambda n: torch.nn.utils.remove_weight_norm(n[3]))]:
        with torch.no_grad():
            before = net(x)
        undo(net)
        check_supported(net, SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(net(x), before)
            out = ibp(net, x, threat)
        assert (out.lower <= before + 1e-5).all() and (before <= out.upper + 1e-5).all()
