-- Named queries of pgflow.db.embedded (the embedded development server).

-- name: allow_superuser
ALTER ROLE postgres SET pgflow.allow_superuser = on;
