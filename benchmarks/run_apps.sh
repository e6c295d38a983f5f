#!/usr/bin/env bash
# Runs the three application studies one after the other (each also runs alone).
set -euo pipefail
PY=${PYTHON:-python}
$PY benchmarks/noisy_labels.py "$@"
$PY benchmarks/defense.py "$@"
$PY benchmarks/fairness.py "$@"
