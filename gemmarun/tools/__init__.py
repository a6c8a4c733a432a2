"""Development tools, outside the runtime import path (`import gemmarun` never loads them): the speed
benchmark behind `gemmarun bench` (bench.py) and random-weight checkpoints of exact model shapes
(random_checkpoint.py). They live in the package, not beside benchmarks/, so that `gemmarun bench`
works from an installed gemmarun."""
