"""Feature computation shared by serving and training: request-time features and Redis reads."""
