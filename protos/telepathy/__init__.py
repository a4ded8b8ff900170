"""The gRPC contract: stubs generated from v1/*.proto by `make protos` (tools/generate_protos.py)."""
