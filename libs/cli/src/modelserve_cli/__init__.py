"""The `modelserve` command line: run the local stack, deploy the demo, call the API."""
