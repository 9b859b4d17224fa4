-- Named queries of pgflow.shape (stored flow versions).

-- name: flow_shape
SELECT ref, shape FROM pgflow.flows WHERE flow_name = %(name)s AND version = %(version)s;
