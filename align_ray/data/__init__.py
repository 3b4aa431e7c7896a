"""Stage 1: URL lists -> downloaded, resized, hashed image/alt-text samples (Ray Data)."""
