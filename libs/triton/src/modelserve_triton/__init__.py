"""Triton for modelserve: run the server from the wheel, configure models, call it over gRPC."""
