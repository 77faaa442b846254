"""The speed and fit benchmark suite (Basis Pursuit, the network and demregpy on the same
pixels, same device): the ``deepem-jax bench`` command.

    python benchmarks/bench_suite.py --out bench_results          # default sizes
    python benchmarks/bench_suite.py --sizes 64,256 --tiled 0     # quick

See :mod:`deepem_jax.bench` for what is measured. Writes ``bench.json`` and ``bench.md`` into
``--out`` and prints the markdown; ``--help`` lists the options.
"""

import sys

from deepem_jax.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="bench_suite.py")
