"""Adapters for third-party harnesses. Each module imports its harness, so none is imported here: import
`hf_dare.integrations.lmms_eval` (or let the harness find it through its entry point) only where that
harness is installed."""
