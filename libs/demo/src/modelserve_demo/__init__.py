"""modelserve demo."""
