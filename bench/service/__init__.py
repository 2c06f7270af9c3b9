"""The server: load, attacks, fairness, lanes, threads, batch sizes, preprocessing and tensor transfer."""
