"""Diagnosis plot of distillation runs (issue 11): python scripts/plot_diagnosis.py RUN_DIR... --out FILE.png"""
import argparse

from certdist.reporting import plot_diagnosis

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("runs", nargs="+", help="run folders (<out_dir>/<name>/seed<k>)")
p.add_argument("--out", default="diagnosis.png")
a = p.parse_args()
print(f"written: {plot_diagnosis(a.runs, a.out)}")
