-- Schemas: pgflow holds the engine's tables and functions; pgflow_exec holds one executor function per role
-- granted usage (see 19_executors.sql), kept apart so that those role-owned functions never sit among
-- pgflow's own.
--
-- Nothing is granted to PUBLIC: pgflow.grant_usage(role) grants a role what it needs (20_usage.sql). Every
-- function is followed by its `REVOKE ALL ... FROM PUBLIC` (PostgreSQL grants EXECUTE to PUBLIC on creation,
-- and per-schema default privileges cannot take away a privilege granted globally, so only an explicit
-- REVOKE makes a function owner-only).

CREATE SCHEMA IF NOT EXISTS pgflow;
REVOKE ALL ON SCHEMA pgflow FROM PUBLIC;

CREATE SCHEMA pgflow_exec;
REVOKE ALL ON SCHEMA pgflow_exec FROM PUBLIC;
