#!/usr/bin/env bash
# The store measurements of docs/benchmarks.md, both engines; one JSON line per run on stdout.
# (sled is an optional cargo feature, off by default: build with `--features sled` for it.)
#   cargo build --release --locked --features sled && bash benches/store_matrix.sh | tee target/store-matrix.jsonl
# Put TMPDIR on the disk you want to measure (not a tmpfs). Takes about 30 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
P="python3 benches/pipeline.py"
SCENARIOS="${SCENARIOS:-writes lowrate onepersec latency drain}"
for s in $SCENARIOS; do
  for b in sled redb; do
    case $s in
      writes)
        for f in 0 100 1000; do
          $P writes --backend $b --flush-ms $f --rate 1000 --count 20000
          $P writes --backend $b --flush-ms $f --rate 1000 --count 20000 --broker-down
        done ;;
      lowrate)
        $P writes --backend $b --flush-ms 100 --rate 20 --count 600
        $P writes --backend $b --flush-ms 100 --rate 20 --count 600 --broker-down ;;
      onepersec)
        $P writes --backend $b --flush-ms 100 --rate 1 --count 120
        $P writes --backend $b --flush-ms 100 --rate 1 --count 120 --broker-down ;;
      latency)
        for f in 0 100 1000; do
          $P latency --backend $b --flush-ms $f --rate 200 --count 2000
        done ;;
      drain)
        $P drain --backend $b --count "${DRAIN_COUNT:-1000000}" --rate 10000 ;;
    esac
  done
done
