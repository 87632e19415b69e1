"""The gRPC coordinator: worker registry, routing, request orchestration, the HTTP
gateway, and the Python clients. It reaches workers only through proto."""
