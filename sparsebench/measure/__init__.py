"""Measuring: the timing and memory harness, decode, the worker process, the run loop, the environment."""
