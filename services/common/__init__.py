"""What every process of the platform shares: settings, pools, errors, logs, metrics, health."""
