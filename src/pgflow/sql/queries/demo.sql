-- Named queries of pgflow.demo. Tables for `pgflow demo`: documents in, embedded chunks out (pgvector when
-- available, else real[]).

-- name: demo_schema
CREATE SCHEMA IF NOT EXISTS pgflow_demo;
CREATE TABLE IF NOT EXISTS pgflow_demo.documents (
    id         integer PRIMARY KEY,
    batch      integer NOT NULL,
    body       text    NOT NULL,
    processed  boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS documents_batch ON pgflow_demo.documents (batch);

-- name: vector_available
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector');

-- name: demo_chunks_vector
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS pgflow_demo.chunks (
    doc_id     integer NOT NULL,
    chunk_no   integer NOT NULL,
    body       text    NOT NULL,
    embedding  vector(64) NOT NULL,
    PRIMARY KEY (doc_id, chunk_no)
);
CREATE OR REPLACE FUNCTION pgflow_demo.to_embedding(v jsonb) RETURNS vector
    LANGUAGE sql IMMUTABLE AS $$ SELECT (v::text)::vector $$;

-- name: demo_chunks_array
CREATE TABLE IF NOT EXISTS pgflow_demo.chunks (
    doc_id     integer NOT NULL,
    chunk_no   integer NOT NULL,
    body       text    NOT NULL,
    embedding  real[]  NOT NULL,
    PRIMARY KEY (doc_id, chunk_no)
);
CREATE OR REPLACE FUNCTION pgflow_demo.to_embedding(v jsonb) RETURNS real[]
    LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY(SELECT jsonb_array_elements_text(v)::real) $$;

-- name: demo_minilm_vector
-- (--embedder minilm: all-MiniLM-L6-v2's 384 dimensions)
CREATE TABLE IF NOT EXISTS pgflow_demo.chunks_minilm (
    doc_id     integer NOT NULL,
    chunk_no   integer NOT NULL,
    body       text    NOT NULL,
    embedding  vector(384) NOT NULL,
    PRIMARY KEY (doc_id, chunk_no)
);

-- name: demo_minilm_array
CREATE TABLE IF NOT EXISTS pgflow_demo.chunks_minilm (
    doc_id     integer NOT NULL,
    chunk_no   integer NOT NULL,
    body       text    NOT NULL,
    embedding  real[]  NOT NULL,
    PRIMARY KEY (doc_id, chunk_no)
);

-- name: demo_reset
TRUNCATE pgflow_demo.chunks, pgflow_demo.chunks_minilm;
UPDATE pgflow_demo.documents SET processed = false WHERE processed;

-- name: demo_document_count
SELECT count(*), coalesce(max(batch) + 1, 0) FROM pgflow_demo.documents;

-- name: demo_replace_documents
DELETE FROM pgflow_demo.documents;

-- name: copy_documents
COPY pgflow_demo.documents (id, batch, body) FROM STDIN;

-- name: allow_superuser_here
-- the demo is a local tool: if it connects as a superuser, let it start its own instances
SET LOCAL pgflow.allow_superuser = on;

-- name: demo_progress
SELECT count(*) FILTER (WHERE i.status IN ('completed', 'failed', 'cancelled')),
       count(*) FILTER (WHERE i.status = 'failed'),
       (SELECT count(*) FROM pgflow.steps s WHERE s.instance_id = ANY(%(ids)s) AND s.status = 'completed')
FROM pgflow.instances i WHERE i.id = ANY(%(ids)s);

-- name: demo_summary
SELECT count(*) FILTER (WHERE status = 'completed'),
       coalesce(sum(attempt - 1) FILTER (WHERE attempt > 1), 0),
       count(*) FILTER (WHERE status = 'failed')
FROM pgflow.steps WHERE instance_id = ANY(%(ids)s);

-- name: demo_check
SELECT (SELECT count(*) FROM pgflow_demo.chunks),
       (SELECT count(*) FROM pgflow_demo.documents WHERE NOT processed);

-- name: demo_check_minilm
SELECT (SELECT count(*) FROM pgflow_demo.chunks_minilm),
       (SELECT count(*) FROM pgflow_demo.documents WHERE NOT processed);
