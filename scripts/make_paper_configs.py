"""Write configs/paper/*.yaml from the published hyper-parameters (run once; the YAMLs are committed).

Source of every value: the expressive-losses repository README (De Palma et al., ICLR 2024), as
tabulated in METHOD.md ("Published hyper-parameters of the CC-IBP / MTL-IBP / Exp-IBP baselines").
Mapping: the ramp "(start, length)" of Shi et al.'s scheduler starts at the end of epoch start-1, so
warmup_epochs = start - 1; milestones are 0-indexed epochs here, as there.
"""
from __future__ import annotations

from pathlib import Path

SRC = "expressive-losses README via METHOD.md"
SETTINGS = {
    # name: dataset, eps(str, float), epochs, (start, length), milestones, batch, (steps, step), extra, reg, alphas/l1
    "mnist_0.1": dict(dataset="mnist", eps="0.1", epochs=70, ramp=(1, 20), ms=(50, 60), batch=256, attack=(1, 10.0),
                      extra={"train_eps_mul": 2.0}, reg=0.5,
                      methods={"cc-ibp": (0.1, 2e-6), "mtl-ibp": (1e-2, 1e-5)}),
    "mnist_0.3": dict(dataset="mnist", eps="0.3", epochs=70, ramp=(1, 20), ms=(50, 60), batch=256, attack=(1, 10.0),
                      extra={"train_eps_mul": 1.334}, reg=0.5,
                      methods={"cc-ibp": (0.3, 3e-6), "mtl-ibp": (8e-2, 1e-6)}),
    "cifar10_2_255": dict(dataset="cifar10", eps="0.00784313725490196  # 2/255", epochs=160, ramp=(2, 80),
                          ms=(120, 140), batch=128, attack=(8, 0.25), extra={"attack.eps_factor": 2.1}, reg=0.5,
                          methods={"cc-ibp": (1e-2, 3e-6), "mtl-ibp": (4e-3, 3e-6), "exp-ibp": (9.5e-2, 4e-6)}),
    "cifar10_8_255": dict(dataset="cifar10", eps="0.03137254901960784  # 8/255", epochs=260, ramp=(2, 80),
                          ms=(180, 220), batch=128, attack=(1, 10.0), extra={}, reg=0.5,
                          methods={"cc-ibp": (0.5, 0.0), "mtl-ibp": (0.5, 1e-7), "exp-ibp": (0.5, 0.0)}),
    "tinyimagenet_1_255": dict(dataset="tinyimagenet", eps="0.00392156862745098  # 1/255", epochs=160, ramp=(2, 80),
                               ms=(120, 140), batch=128, attack=(1, 10.0), extra={}, reg=0.2,
                               methods={"cc-ibp": (1e-2, 5e-5), "mtl-ibp": (1e-2, 5e-5), "exp-ibp": (4e-2, 5e-5)}),
    "imagenet64_1_255": dict(dataset="imagenet64", eps="0.00392156862745098  # 1/255", epochs=80, ramp=(2, 20),
                             ms=(60, 70), batch=128, attack=(1, 10.0), extra={}, reg=0.2,
                             methods={"cc-ibp": (5e-2, 1e-5), "mtl-ibp": (5e-2, 1e-5), "exp-ibp": (5e-2, 1e-5)}),
}


def common(name: str, s: dict, method: str) -> list[str]:
    start, length = s["ramp"]
    lines = [
        f"# {name}, {method}: published setting ({SRC}); CNN7 (Shi et al. 2021)",
        f"name: {name}_{method}",
        f"method: {method}",
        f"eps: {s['eps']}",
        f"epochs: {s['epochs']}            # {SRC}",
        f"warmup_epochs: {start - 1}        # ramp start {start} ({SRC}); Shi et al. scheduler",
        f"ramp_epochs: {length}          # ramp length ({SRC})",
        f"lr_milestones: [{s['ms'][0]}, {s['ms'][1]}]   # lr x0.2 ({SRC})",
        "lr_decay: 0.2",
        "lr: 5.0e-4                # Adam ({SRC})".replace("{SRC}", SRC),
        "optimizer: adam",
        "grad_clip: 10.0           # gradient-norm clip ({SRC})".replace("{SRC}", SRC),
        f"batch_size: {s['batch']}",
        f"reg_weight: {s['reg']}           # Shi et al. regulariser weight ({SRC})",
        f"data: {{dataset: {s['dataset']}}}",
        "model: {arch: cnn7, init: ibp}",
        "eval: {pgd_steps: 40, pgd_restarts: 1, pgd_step_size: 0.035}   # test-time attack of that code",
        f"out_dir: runs/paper",
    ]
    return lines


def write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "configs" / "paper"
    out.mkdir(parents=True, exist_ok=True)
    for name, s in SETTINGS.items():
        steps, step = s["attack"]
        attack = {"steps": steps, "step_size": step, "random_start": "true"}
        extra = dict(s["extra"])
        if "attack.eps_factor" in extra:
            attack["eps_factor"] = extra.pop("attack.eps_factor")
        attack_line = "attack: {" + ", ".join(f"{k}: {v}" for k, v in attack.items()) + f"}}   # train attack ({SRC})"
        for method, (alpha, l1) in s["methods"].items():
            lines = common(name, s, method) + [f"alpha: {alpha}            # {SRC}", f"l1: {l1}              # {SRC}",
                                               attack_line]
            lines += [f"{k}: {v}          # {SRC}" for k, v in extra.items()]
            write(out / f"{name}_{method}.yaml", lines)
        # CC-Dist: the CC-IBP setting plus a PGD-AT teacher (beta default 5 / feature_dim: reconstructed)
        alpha, l1 = s["methods"]["cc-ibp"]
        lines = common(name, s, "cc-ibp") + [f"alpha: {alpha}", f"l1: {l1}", attack_line]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        lines[0] = f"# {name}, CC-Dist: the CC-IBP setting + feature distillation from a PGD-AT teacher (reconstructed)"
        lines[1] = f"name: {name}_cc-dist"
        lines.append(f"distill: {{teacher: runs/paper/{name}_pgd-at-teacher/seed0/last.pt, loss: box, level: features, "
                     "teacher_input: clean}   # beta: 5 / feature_dim (reconstructed default)")
        write(out / f"{name}_cc-dist.yaml", lines)
        # the teacher: PGD-AT (Madry et al.), 10 steps of 0.25 eps, same epochs and lr schedule (reconstructed)
        lines = [f"# {name}: PGD-AT teacher for CC-Dist (reconstructed: not published in METHOD.md)",
                 f"name: {name}_pgd-at-teacher", "method: pgd-at", f"eps: {s['eps']}",
                 f"epochs: {s['epochs']}", "warmup_epochs: 0", "ramp_epochs: 0",
                 f"lr_milestones: [{s['ms'][0]}, {s['ms'][1]}]", "lr_decay: 0.2", "lr: 5.0e-4", "grad_clip: 10.0",
                 f"batch_size: {s['batch']}", "reg_weight: 0.0",
                 "attack: {steps: 10, step_size: 0.25, random_start: true}",
                 f"data: {{dataset: {s['dataset']}}}", "model: {arch: cnn7, init: default}",
                 "eval: {pgd_steps: 40, pgd_restarts: 1, pgd_step_size: 0.035}", "out_dir: runs/paper"]
        write(out / f"{name}_pgd-at-teacher.yaml", lines)


if __name__ == "__main__":
    main()
