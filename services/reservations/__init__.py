"""Driver-facing service: accounts, quotes, reservations and their lifecycle."""
