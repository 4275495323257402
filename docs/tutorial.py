"""certdist from Python on your own network and data: a runnable tutorial (about 20 s on one CPU core).

    python docs/tutorial.py [--out runs/tutorial]

1. your data: any DataLoader of (images in [0, 1], labels); here a small synthetic 10-class set;
2. your network: a plain nn.Sequential (normalisation inside, a final nn.Linear);
3. train a PGD-AT teacher, a CC-IBP student and a CC-Dist student (CC-IBP + the teacher) with certdist.fit;
4. attack them with the standard AutoAttack (certdist.evaluate), certify them with the full verification
   pipeline (certdist.certify), look at the bounds (certdist.crown), export ONNX + VNN-LIB.

CI runs this file (tests/integration/test_tutorial.py). See docs/api.md for every function.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certdist
from certdist.specs import margin_matrix
from certdist.verification import format_summary

EPS = "8/255"  # the field's notation; a plain number (0.0157) works as well


def synthetic_digits(n: int, seed: int) -> TensorDataset:
    """``n`` 1x10x10 images of 10 classes: a fixed random pattern per class plus noise, in [0, 1]."""
    patterns = (torch.rand(10, 1, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (0.35 + 0.3 * patterns[labels] + 0.25 * torch.randn(n, 1, 10, 10, generator=g)).clamp(0, 1)
    return TensorDataset(images, labels)


def network() -> nn.Sequential:
    """Any chain of supported layers (Linear, Conv2d, ReLU, BatchNorm, AvgPool2d, Flatten) ending in a Linear."""
    return nn.Sequential(certdist.Normalize(mean=[0.5], std=[0.3]), nn.Flatten(),
                         nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main(out: str = "runs/tutorial") -> dict:
    torch.manual_seed(0)
    start = time.time()
    train_loader = DataLoader(synthetic_digits(2000, seed=1), batch_size=100, shuffle=True)
    test_loader = DataLoader(synthetic_digits(300, seed=2), batch_size=100)

    # Training: the same loop as `certdist train` (schedules, regularisers, checkpoints in out/<name>/seed0/).
    # Any config key is an option (see `certdist train --help`); sections are dicts.
    common = dict(eps=EPS, epochs=8, warmup_epochs=1, ramp_epochs=4, lr=2e-3, lr_milestones=[6],
                  out_dir=out, overwrite=True, progress=False, test_loader=test_loader)
    teacher = network()
    certdist.fit(teacher, train_loader, method="pgd-at", name="teacher", attack={"steps": 3, "step_size": 0.5},
                 **common)
    cc_ibp = network()
    certdist.fit(cc_ibp, train_loader, method="cc-ibp", name="cc-ibp", alpha=0.3, **common)
    cc_dist = network()  # CC-Dist = CC-IBP + feature distillation from the frozen teacher
    certdist.fit(cc_dist, train_loader, method="cc-ibp", name="cc-dist", alpha=0.3, teacher=teacher,
                 distill={"beta": 0.01}, **common)

    print(f"training: {time.time() - start:.1f} s")
    results = {}
    for name, model in [("teacher", teacher), ("cc-ibp", cc_ibp), ("cc-dist", cc_dist)]:
        # Evaluation: clean, attacked and IBP-certified accuracy; attack "autoattack" is the standard
        # AutoAttack (APGD-CE, APGD-T, FAB-T, Square), "apgd" / "pgd" the faster own attacks.
        ev = certdist.evaluate(model, test_loader, EPS, attack="autoattack" if name == "cc-dist" else "apgd", limit=50)
        # Verification: attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP per point (sound for the float32 model).
        # (short settings for the tutorial; the defaults are timeout=10, attack_steps=100, restarts=5)
        cert = certdist.certify(model, test_loader, EPS, limit=20, timeout=0.5, attack_steps=20, restarts=1)
        results[name] = {"clean": ev["clean_acc"], ev["attack"]: ev["robust_acc"], "ibp_cert": ev["ibp_cert_acc"],
                         "verified": 100 * cert["certified_accuracy"]}
        print(f"{name:8s} clean {ev['clean_acc']:5.1f}%  {ev['attack']} {ev['robust_acc']:5.1f}%  "
              f"IBP-certified {ev['ibp_cert_acc']:5.1f}%  verified (20 points) {100 * cert['certified_accuracy']:5.1f}%"
              f"   [{time.time() - start:.1f} s]")
    print(f"\ncertify summary of the CC-Dist student:\n{format_summary({k: v for k, v in cert.items() if k != 'records'})}")

    # Bounds on a batch: full CROWN (the default), CROWN-IBP and IBP of the margins y - j.
    x, y = next(iter(test_loader))
    threat = certdist.ThreatModel(EPS)
    C = margin_matrix(y[:8], 10)  # rows e_y - e_j: lower bounds > 0 prove the label
    cc_dist.eval()
    with torch.no_grad():
        for fn in (certdist.ibp, certdist.crown_ibp, certdist.crown):
            b = fn(cc_dist, x[:8], threat, C=C)
            print(f"{fn.__name__:10s} mean lower bound of the margins {float(b.lower.mean()):+.3f}")

    # Export: ONNX (checked against torch) and one VNN-LIB property per test point, for external verifiers.
    instances = certdist.export_benchmark(cc_dist, x[:10], y[:10], threat.eps, f"{out}/export")
    print(f"exported {len(instances.read_text().splitlines())} VNN-LIB properties: {instances}")
    print(f"tutorial done in {time.time() - start:.1f} s")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tutorial")
    main(parser.parse_args().out)
