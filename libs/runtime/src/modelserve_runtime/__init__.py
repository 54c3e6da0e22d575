"""Shared runtime of every modelserve service: settings, logs, traces, errors, gRPC plumbing."""
