"""Benchmark scripts: figures and ratios against a same-run baseline, written to results/.

They import `mel` (and `demo`) like any user code, with no sys.path edits. Two ways to run one:
    python -m bench.bench_kb --rows 100000        # from the repository root: nothing to install
    python bench/bench_kb.py --rows 100000        # README's form: needs the project installed in the
                                                  # environment (pip install --no-deps -e .)
Tests import them as modules (`bench.bench_load`). bench/app_server.py is the harness that starts the
real app for the benchmarks and the tests; a script imports it as `.app_server` in the first form and
`app_server` (its own folder is sys.path[0]) in the second.
"""
