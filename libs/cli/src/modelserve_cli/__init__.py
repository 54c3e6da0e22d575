"""modelserve cli."""
