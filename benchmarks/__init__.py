"""Standalone measurement scripts (`python benchmarks/NAME.py --help`), and the throwaway
deployment they share with the test suite (`support.py`, `s3_proxy.py`)."""
