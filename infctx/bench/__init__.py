"""Benchmarks that write JSON + Markdown tables to bench/results/ (kernels, data pipeline, training)."""
