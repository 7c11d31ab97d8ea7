"""Tests. A regular package, so `tests.*` resolves here before a site-packages `tests` (torch-fidelity 0.4.0's wheel installs one)."""
