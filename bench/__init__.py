"""Benchmarks (not part of the test suite): ``./scripts/bench`` runs every part in one process
run and writes ``BENCHMARKS.md``. Each part measures our code side by side with its floor or
its peers, interleaved, and reports ratios: the machines are shared and noisy, so absolute
times drift while ratios hold."""
