"""Where heavy work runs (DESIGN 2): two executors, the same job functions.

- in-process (default): a job runs in a thread of the API worker (`backend.api.jobs.JobExecutor`,
  one heavy job per device); a sweep runs its shards one after the other
  (`backend.circuits.pipeline.local_map`).
- Ray (`PIESCOPE_EXECUTOR=ray`, `backend.executors.ray_executor`): a sweep's shards run as Ray
  tasks on actors that each load the model and transcoder once, and merge into the same result.
"""
