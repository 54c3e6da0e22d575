"""The Triton python-backend model shipped as a file inside load requests, not imported here."""
