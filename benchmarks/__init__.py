"""Benchmarks (`pdserve bench NAME`), their shared helpers, and fake workers for load tests."""
