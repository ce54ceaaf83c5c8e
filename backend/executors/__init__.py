"""Where heavy work runs (DESIGN 2): two executors, the same job functions.

- in-process (default): a job runs in a thread of the API worker (`backend.api.jobs.JobExecutor`,
  one heavy job per device); a sweep, an edge sweep or a HAGD verification runs its shards one
  after the other (`backend.circuits.pipeline.local_map`).
- Ray (`PIESCOPE_EXECUTOR=ray`, `backend.executors.ray_executor`): those shards (a sweep's prompt
  batches, an edge sweep's attribution scores and (method, edge count) points, HAGD's
  verification prompt sets) run as Ray tasks on actors that each load the model (and
  transcoder) once, and merge into the same result.
"""
