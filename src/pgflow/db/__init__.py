"""The database layer: named queries, connections and pools, the JSON codec, the embedded server, migrations."""
