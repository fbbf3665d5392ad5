"""Benchmarks and cluster sizing: analytic FLOPs/MFU, the throughput/memory matrix runner,
the all-reduce sweep, and the sizing model fitted from their measurements."""
