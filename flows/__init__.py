"""Prefect orchestration of the shards/ library: the build-shards flow, its deployments, its CLI.

Kept free of imports here so that `python -m flows --help`, option checks and the spawned
shard-writing processes (shards/pool.py) do not pay for importing Prefect.
"""
