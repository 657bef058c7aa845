"""Benchmarks of minimask (speed lives here, never in the tests): ``python -m bench.<name>``."""
