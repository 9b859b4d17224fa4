"""The engine: what runs in the coordinator process (DAG scheduling, the tree evaluator, maintenance) and in
worker processes (the worker loop, one runner per kind of step, the supervisor). Workers import nothing of
the coordinator, and neither imports the client."""
