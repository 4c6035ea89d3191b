"""Benchmarks: `shardserve bench serve` load-tests a running server."""
