"""modelserve triton."""
