"""The hostile-input probe (python -m tests.probe --help); not part of the test suite."""
