"""Demo helpers: synthetic but realistic inputs for the demo, tests and benchmarks."""
