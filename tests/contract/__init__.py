"""The public contract and the promises about the code: proto (buf), the Node client, layering, benchmarks."""
