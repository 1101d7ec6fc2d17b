"""Device state: versioned, checksummed snapshots of every function."""
