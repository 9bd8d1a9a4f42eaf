"""Evaluation libraries: BSSEval scoring, MIX/IRM baselines, reports, per-track work shared by the runners."""
