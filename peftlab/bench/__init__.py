"""Benchmarks: training speed and memory (speed), accuracy after a fixed budget (quality)."""
