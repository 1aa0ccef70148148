"""Evaluation: benchmarks, boxed-answer grading with math-verify, avg@n / pass@k / maj@n."""
