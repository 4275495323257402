"""Imports stay one-way and light: the soundness rule that :mod:`certdist.evaluation` shares with
``certify`` comes without the complete verifiers (BaB, chain BaB, MILP)."""
from __future__ import annotations

import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('certdist')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_evaluation_does_not_load_the_complete_verifiers():
    loaded = _loaded_after("import certdist.evaluation")
    assert "certdist.verification.soundness" in loaded
    heavy = {"certdist.verification.bab", "certdist.verification.chain_bab", "certdist.verification.milp",
             "certdist.verification.stages", "certdist.verification.certify"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_the_public_certify_names_still_import_from_certify():
    loaded = _loaded_after("from certdist.verification.certify import (certify_dataset, CertifyConfig, read_records, "
                           "summarize, format_summary, merge, validate_counterexample, VERIFIER_VERSION, STAGES, "
                           "COMPLETE_METHODS)")
    assert "certdist.verification.stages" in loaded
