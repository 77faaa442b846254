"""The speedup benchmark suite (network vs Basis Pursuit, same pixels, same device).

    python benchmarks/bench_suite.py --out bench_results          # default sizes, < 10 min
    python benchmarks/bench_suite.py --sizes 64,256 --tiled 0     # quick

Same as ``deepem-jax bench``; see :mod:`deepem_jax.bench` for what is measured. Writes
``bench.json`` and ``bench.md`` into ``--out`` and prints the markdown table.
"""

import argparse

from deepem_jax.bench import run_suite, to_markdown, write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,1024")
    ap.add_argument("--tiled", type=int, default=4096, help="0 to skip the tiled network run")
    ap.add_argument("--highs-pixels", type=int, default=300)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    report = run_suite(sizes, args.tiled or None, highs_pixels=args.highs_pixels)
    jpath, mpath = write_report(report, args.out)
    print(to_markdown(report))
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
