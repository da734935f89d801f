"""shardline's dataset-to-shards library: sources, verification, planning, writing, manifest.

No Prefect and no torch here, so any orchestrator (a script, Prefect, Dask, Ray) can drive it.
"""
