"""Benchmarks of ollamux: trace replay of routing policies side by side, and the proxy's own cost.

``python -m benchmarks.routing`` replays seeded workloads (the Azure LLM conversation trace and
synthetic scenarios) against every contender on the same emulated 4-GPU box; ``python -m
benchmarks.overhead`` measures what the proxy adds to a stream against direct access and nginx.
"""
