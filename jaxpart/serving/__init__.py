"""serving: continuous batching over the placed pipeline (issue 24): a paged KV block pool,
requests and their sampling settings, a step scheduler, synthetic request streams, the compiled
paged step on a Plan (step.py) and the host loop that drives it (engine_loop.py)."""
