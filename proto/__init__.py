"""The wire: pdserve.proto and its stubs, proto <-> Python conversions (convert.py), gRPC
server and channel helpers (grpc_util.py)."""
