"""serving: continuous batching over the placed pipeline (issue 24): a paged KV block pool,
requests and their sampling settings, a step scheduler and synthetic request streams."""
