"""Benchmarks: deltalog's throughput as ratios to the physical limits and to the old pipeline.

``python -m benchmarks [--quick | --smoke] [--out DIR]`` runs them all
against moto's S3 + DynamoDB server in a child process, prints a table and
writes ``results.json`` and PNG plots into ``DIR`` (``benchmarks/results/``
by default).

Every headline figure is a **ratio** of two measurements taken in the same
run, against the same endpoint, at the same concurrency: absolute times on
a shared machine drift, ratios much less. The modules:

- ``append``: deltas/s, MB/s, vectors/s and latency of appends, group commit
  on and off, against raw ``PutObject`` of objects of the same size;
- ``compaction``: replay (list, fetch, decode, verify, fold, apply) and
  rebuild against raw ``chromadb`` upserts of the same vectors; publish MB/s;
- ``incremental``: the cost of compacting 100 new entries as the log grows;
- ``codec``: entry encode/decode against JSON lists of floats;
- ``fresh``: query latency with an uncompacted tail against snapshot reads;
- ``baseline``: the per-receipt Chroma-directory pipeline deltalog replaces;
- ``latency_proxy``: a loopback proxy adding 20-100 ms per request, through
  which append and compaction run again.
"""
