-- Named queries of pgflow.limits (declaring limits; their admission is in sql/schema/22_limits.sql).

-- name: define_limit
SELECT pgflow.define_limit(%(name)s, %(requests)s, %(cost)s, %(per)s, %(concurrency)s, %(burst)s);
