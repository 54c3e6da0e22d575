"""The demo model that modelserve ships with: card-fraud scoring trained on synthetic data."""
