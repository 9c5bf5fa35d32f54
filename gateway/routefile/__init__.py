"""The route file: YAML with positions, schema, semantic checks, findings, load, reload, watch."""
